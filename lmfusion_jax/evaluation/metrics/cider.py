"""CIDEr-D caption metric (Vedantam, Zitnick, Parikh 2015; the variant the COCO caption evaluation reports).

For a candidate caption c of image i with references S_i = {s_i1 .. s_im}:

  g_n(x)[w]   = tf_x(w) * idf(w)                 for every n-gram w of length n in sentence x
  idf(w)      = log(|I|) - log(max(1, df(w)))    |I| = images in the evaluated corpus,
                                                 df(w) = images whose reference SET contains w
  CIDEr-D_n   = 10/m * sum_j  exp(-(l(c) - l(s_ij))^2 / (2 sigma^2))
                       * <min(g_n(c), g_n(s_ij)), g_n(s_ij)> / (|g_n(c)| |g_n(s_ij)|)
  CIDEr-D     = mean over n = 1..4 of CIDEr-D_n, sigma = 6;  corpus score = mean over images.

`min` is element-wise (candidate n-gram weights are clipped by the reference's), a cosine whose vector
has zero norm contributes 0, and l(x) is the number of tokens of x. Document frequencies come from the
references of the corpus being scored, so a score depends on the whole corpus (as in COCO's scorer).

Tokenization (`tokenize`): lowercase, delete apostrophes ("dog's" -> "dogs"), turn every other
non-alphanumeric character (punctuation, underscore) into a space, split on whitespace. COCO's scorer
runs the Stanford PTB tokenizer (Java) instead, so absolute numbers can differ slightly from COCO's on
raw text; on already-tokenized lowercase text without punctuation the two agree.

One deliberate difference from the pycocoevalcap code: that code measures l(x) as the number of
BIGRAMS (tokens - 1, or 0); we use tokens, as the paper's formula says. The two agree whenever both
sentences have at least 2 tokens.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Hashable, Mapping, Sequence

MAX_N = 4
SIGMA = 6.0

_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
  """Lowercase, drop apostrophes, other punctuation -> space, split on whitespace."""
  if not isinstance(text, str):
    raise TypeError(f"caption must be a str, got {type(text).__name__}: {text!r}")
  return _NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> list[collections.Counter]:
  """[Counter of n-grams of length n+1 for n in 0..max_n-1]; each n-gram is a tuple of tokens."""
  return [collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
          for n in range(1, max_n + 1)]


def document_frequencies(reference_counts: Sequence[Sequence[list[collections.Counter]]]
                         ) -> collections.Counter:
  """df(w) = number of images whose reference set contains n-gram w (each image counts once)."""
  df = collections.Counter()
  for refs in reference_counts:
    seen = set()
    for ref in refs:
      for counts in ref:
        seen.update(counts)
    df.update(seen)
  return df


def _tfidf(counts: list[collections.Counter], df: Mapping, log_num_images: float):
  """Per n: (dict n-gram -> tf * idf, L2 norm of that vector)."""
  vectors, norms = [], []
  for counts_n in counts:
    vec = {g: tf * (log_num_images - math.log(max(1.0, df.get(g, 0)))) for g, tf in counts_n.items()}
    vectors.append(vec)
    norms.append(math.sqrt(sum(v * v for v in vec.values())))
  return vectors, norms


def _clipped_cosine(cand_vec, cand_norm, ref_vec, ref_norm) -> float:
  if cand_norm == 0.0 or ref_norm == 0.0:
    return 0.0
  dot = sum(min(v, ref_vec[g]) * ref_vec[g] for g, v in cand_vec.items() if g in ref_vec)
  return dot / (cand_norm * ref_norm)


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            sigma: float = SIGMA, max_n: int = MAX_N) -> tuple[float, dict]:
  """CIDEr-D of `candidates` (id -> caption) against `references` (id -> list of captions).

  Returns (corpus score = mean of per-id scores, {id: score}). Every candidate id needs at least one
  reference; references for ids without a candidate are an error too (they would change df).
  """
  if not candidates:
    raise ValueError("cider_d: no candidates given")
  missing = [i for i in candidates if i not in references]
  if missing:
    raise ValueError(f"cider_d: candidate id {missing[0]!r} has no references "
                     f"({len(missing)} candidate ids without references)")
  extra = [i for i in references if i not in candidates]
  if extra:
    raise ValueError(f"cider_d: reference id {extra[0]!r} has no candidate caption "
                     f"({len(extra)} such ids)")
  ids = list(candidates)
  ref_tokens = {}
  for i in ids:
    refs = references[i]
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"cider_d: references[{i!r}] must be a non-empty list of captions, got {refs!r}")
    ref_tokens[i] = [tokenize(r) for r in refs]
  cand_tokens = {i: tokenize(candidates[i]) for i in ids}

  ref_counts = {i: [ngram_counts(t, max_n) for t in ref_tokens[i]] for i in ids}
  df = document_frequencies([ref_counts[i] for i in ids])
  log_num_images = math.log(float(len(ids)))

  per_id = {}
  for i in ids:
    cand_vecs, cand_norms = _tfidf(ngram_counts(cand_tokens[i], max_n), df, log_num_images)
    total = 0.0
    for toks, counts in zip(ref_tokens[i], ref_counts[i]):
      ref_vecs, ref_norms = _tfidf(counts, df, log_num_images)
      delta = len(cand_tokens[i]) - len(toks)
      penalty = math.exp(-(delta ** 2) / (2.0 * sigma ** 2))
      sims = [_clipped_cosine(cand_vecs[n], cand_norms[n], ref_vecs[n], ref_norms[n])
              for n in range(max_n)]
      total += penalty * sum(sims) / max_n
    per_id[i] = 10.0 * total / len(ref_tokens[i])
  return sum(per_id.values()) / len(per_id), per_id
