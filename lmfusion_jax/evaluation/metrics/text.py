"""Caption accuracy for class-labelled images (the digits demo): does the caption name the right class?"""
from __future__ import annotations

from typing import Sequence

from lmfusion_jax.evaluation.metrics.cider import tokenize
from lmfusion_jax.errors import UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _mention_table(label_words: Sequence[str | Sequence[str]]) -> dict[str, int]:
  """token -> class: each class is named by its word(s) and by its numeral str(class)."""
  table: dict[str, int] = {}
  for label, words in enumerate(label_words):
    names = [words] if isinstance(words, str) else list(words)
    names = [t for w in names for t in tokenize(w)] + [str(label)]
    for name in names:
      if table.get(name, label) != label:
        raise UserError(f"label_words: {name!r} names both class {table[name]} and class {label}")
      table[name] = label
  return table


def mentioned_labels(caption: str, label_words: Sequence[str | Sequence[str]] = DIGIT_WORDS) -> set[int]:
  """Classes a caption mentions: a token equal to a class word (e.g. "seven") or numeral ("7").

  Tokens are whole words after `tokenize`, so "17" or "sevens" mention nothing.
  """
  table = _mention_table(label_words)
  return {table[t] for t in tokenize(caption) if t in table}


def caption_accuracy(generated: Sequence[str], labels: Sequence[int],
                     label_words: Sequence[str | Sequence[str]] = DIGIT_WORDS) -> float:
  """Fraction of captions whose ONLY mentioned class is the right one.

  generated[k] is the caption produced for an image of class labels[k]; label_words[c] is the word (or
  list of synonyms) for class c, and the numeral str(c) also counts. A caption naming no class, a wrong
  class, or the right class plus another one is wrong; repeating the right class is fine.
  """
  if len(generated) != len(labels):
    raise UserError(f"caption_accuracy: {len(generated)} captions but {len(labels)} labels")
  if len(generated) == 0:
    raise UserError("caption_accuracy: no captions given")
  table = _mention_table(label_words)
  correct = 0
  for k, (caption, label) in enumerate(zip(generated, labels)):
    if not 0 <= int(label) < len(label_words):
      raise UserError(f"caption_accuracy: labels[{k}] = {label} outside 0..{len(label_words) - 1}")
    mentioned = {table[t] for t in tokenize(caption) if t in table}
    correct += mentioned == {int(label)}
  return correct / len(generated)
