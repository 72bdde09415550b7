"""The digits assets of the tiny config, built once per machine: the TFDS dataset and a small BPE tokenizer.

  ensure_digits_assets(image_size, vocab_size, cache_dir=None) -> (data_dir, tokenizer_dir)

The cache folder is `cache_dir`, else $LMFUSION_JAX_CACHE, else ~/.cache/lmfusion_jax; it holds one entry
per (image_size, vocab_size):

  CACHE/digits-s{image_size}-v{vocab_size}/tfds/        the digits TFDS dataset (ArrayRecord)
                                          /tokenizer/   BPE with Llama-3 specials (BOS, EOS, BOI, EOI, PAD)
                                          /assets.json  what the entry holds (written last)

An entry is built in a private temporary sibling and renamed into place in one step, so it is complete or
absent. Two processes that race both build; the first rename wins, and the loser (its rename finds the entry
there) deletes its copy and uses the winner's. A call that finds the entry does no work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from lmfusion_jax.checkpoints.files import absolute_path
from lmfusion_jax.errors import UserError

CACHE_ENV = "LMFUSION_JAX_CACHE"
MANIFEST = "assets.json"


def cache_root(cache_dir: Optional[str] = None) -> str:
  """The absolute cache folder: `cache_dir`, else $LMFUSION_JAX_CACHE, else ~/.cache/lmfusion_jax."""
  root = absolute_path(cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "lmfusion_jax"))
  if "://" in root:
    raise UserError(f"digits cache folder {root}: must be a local folder (cache_dir or ${CACHE_ENV})")
  return root


def digits_tokenizer_texts() -> list:
  """The digits tokenizer corpus (this cache's and the demo's): every digit caption four times, the number
  sentences, and each caption followed by three facts about its number."""
  from lmfusion_jax.data.tfds_digits import TEMPLATES, all_captions
  captions = all_captions()
  facts = [caption_with_fact(c, i // len(TEMPLATES), k) for i, c in enumerate(captions) for k in range(3)]
  return captions * 4 + number_sentences() + facts


def number_sentences() -> list:
  """Plain text about the numbers zero..nine (counting, arithmetic, numerals vs words), so that a small
  pretrained LM, like a real Llama, represents each number distinctly; in captions alone the ten number
  words are interchangeable and the LM would have no reason to tell them apart."""
  from lmfusion_jax.data.tfds_digits import WORDS as words
  out = []
  for a in range(10):
    out += [f"the digit {a} is written as {words[a]}", f"{words[a]} is the number {a}"]
    if a < 9:
      out += [f"after {words[a]} comes {words[a + 1]}", f"{a} plus one is {a + 1}"]
    out += [f"{words[a]} plus {words[b]} is {words[a + b]}" for b in range(10 - a)]
  return out + [" ".join(words)]


def caption_with_fact(caption: str, digit: int, kind: int) -> str:
  """A caption followed by a statement about its number (numeral <-> word, successor, predecessor): text in
  which what comes after a caption depends on the number it names, as in real web text."""
  from lmfusion_jax.data.tfds_digits import WORDS as words
  kind %= 3
  if kind == 0:
    has_numeral = any(ch.isdigit() for ch in caption)
    tail = f"in words {words[digit]}" if has_numeral else f"in numerals {digit}"
  elif kind == 1:
    tail = f"the next number is {words[(digit + 1) % 10]}"
  else:
    tail = f"the number before it is {words[(digit - 1) % 10]}"
  return f"{caption}; {tail}"


def _paths(entry: str) -> tuple:
  return os.path.join(entry, "tfds"), os.path.join(entry, "tokenizer")


def _complete(entry: str) -> bool:
  """Whether `entry` is a finished cache entry (entries only appear by rename, manifest written last)."""
  if not os.path.exists(entry):
    return False
  if not os.path.isfile(os.path.join(entry, MANIFEST)):
    raise UserError(f"cache entry {entry} exists but has no {MANIFEST} (not written by lmfusion_jax); "
                    f"delete it or choose another cache folder (${CACHE_ENV})")
  return True


def _fill(tmp: str, image_size: int, vocab_size: int) -> None:
  """Builds the dataset and the tokenizer into the (private) folder `tmp`; the manifest last."""
  from lmfusion_jax.data.build import build_dataset
  from lmfusion_jax.data.tokenizer import train_tokenizer
  data_dir, tok_dir = _paths(tmp)
  build_dataset("digits", data_dir, image_size=image_size)
  train_tokenizer(digits_tokenizer_texts(), vocab_size, tok_dir)
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump({"dataset": "digits", "image_size": image_size, "vocab_size": vocab_size}, f)


def ensure_digits_assets(image_size: int, vocab_size: int, cache_dir: Optional[str] = None) -> tuple:
  """(data_dir, tokenizer_dir): absolute paths of the cached digits dataset at `image_size` and of a BPE
  tokenizer of `vocab_size` trained on the demo's corpus; built on the first call, reused afterwards."""
  image_size, vocab_size = int(image_size), int(vocab_size)
  root = cache_root(cache_dir)
  entry = os.path.join(root, f"digits-s{image_size}-v{vocab_size}")
  if not _complete(entry):
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.tmp-", dir=root)
    os.chmod(tmp, 0o755)     # mkdtemp's 0700 would become the entry's mode
    try:
      _fill(tmp, image_size, vocab_size)
      os.rename(tmp, entry)     # atomic; fails if another process got there first
    except OSError:
      if not _complete(entry):
        raise
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  return _paths(entry)
