"""Typed model inputs: what `LMFusion.__call__` takes (a packed batch's text part and image part).

  TextInputs   tokens, positions, segment_ids                  each int32 [batch, T]
  ImageInputs  latents float [batch, I, H, W, C] (noisy), timesteps int32 [batch, I],
               positions, segment_ids                          each int32 [batch, I]
T or I may be 0. Positions are inside the token's own document (an image's is that of its first token);
segment id 0 marks padding / an empty slot (see lmfusion_jax.data.batch for the packed-batch contract).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmfusion_jax.models.mask import TokenInfo, image_info, text_info


class TextInputs(NamedTuple):
  tokens: jax.Array
  positions: jax.Array
  segment_ids: jax.Array

  @classmethod
  def from_batch(cls, batch: dict) -> "TextInputs":
    return cls(batch["tokens"], batch["text_positions"], batch["text_segment_ids"])

  def info(self) -> TokenInfo:
    return text_info(self.positions, self.segment_ids)


class ImageInputs(NamedTuple):
  latents: jax.Array
  timesteps: jax.Array
  positions: jax.Array
  segment_ids: jax.Array

  @classmethod
  def from_batch(cls, batch: dict, noisy_latents: jax.Array, timesteps: jax.Array) -> "ImageInputs":
    """A packed batch's image slots with the given noisy latents and timesteps [B, I]."""
    return cls(noisy_latents, timesteps, batch["image_positions"], batch["image_segment_ids"])

  @classmethod
  def one_per_row(cls, latents: jax.Array, timesteps: jax.Array, positions: jax.Array) -> "ImageInputs":
    """One image per row: latents [R, H, W, C], timesteps [R], positions [R] (first image token's)."""
    rows = latents.shape[0]
    return cls(latents[:, None], timesteps[:, None], positions.reshape(rows, 1), jnp.ones((rows, 1), jnp.int32))

  @property
  def num_slots(self) -> int:
    return self.latents.shape[1]

  def info(self, tokens_per_image: int) -> TokenInfo:
    return image_info(self.positions, self.segment_ids, tokens_per_image)
