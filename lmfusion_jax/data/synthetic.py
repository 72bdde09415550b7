"""A deterministic synthetic data source: random latents and random captions (benchmarks and tests).

Record i is a pure function of (seed, split, i): latent ~ N(0, 1) of shape [size, size, channels] and
a caption of 1..max_words words from a small fixed word list. Random access, picklable (Grain source).
"""
from __future__ import annotations

import numpy as np

from lmfusion_jax.errors import UserError

WORDS = ("a", "the", "red", "blue", "green", "small", "large", "cat", "dog", "bird", "house", "tree",
         "on", "under", "near", "sunny", "dark", "street", "river", "mountain", "photo", "painting",
         "of", "with", "two", "three", "old", "new", "bright", "quiet")
_SPLIT_SALT = {"train": 0, "test": 1, "validation": 2}


class SyntheticSource:
  """len() records `{"caption", "latent", "id"}` (grain RandomAccessDataSource protocol)."""

  def __init__(self, num_records: int = 4096, image_size: int = 32, channels: int = 4, seed: int = 0,
               split: str = "train", max_words: int = 12):
    if split not in _SPLIT_SALT:
      raise UserError(f"synthetic source: unknown split {split!r} (have {sorted(_SPLIT_SALT)})")
    if num_records < 1 or max_words < 1:
      raise UserError(f"synthetic source: num_records={num_records}, max_words={max_words} must be >= 1")
    self.num_records, self.image_size, self.channels = num_records, image_size, channels
    self.seed, self.split, self.max_words = seed, split, max_words

  @property
  def latent_shape(self) -> tuple:
    return (self.image_size, self.image_size, self.channels)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"synthetic source: index {index} out of range [0, {self.num_records})")
    rng = np.random.default_rng([self.seed, _SPLIT_SALT[self.split], index])
    n = int(rng.integers(1, self.max_words + 1))
    caption = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n))
    latent = rng.standard_normal(self.latent_shape, dtype=np.float32)
    return {"caption": caption, "latent": latent, "id": f"synthetic-{self.split}-{index}"}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_records={self.num_records}, latent_shape={self.latent_shape}, "
            f"seed={self.seed}, split={self.split!r})")
