"""Which key a query may attend: per-token metadata (`TokenInfo`) and the hybrid LMFusion mask.

A leaf module: both attention implementations (attention.py, flash_attention.py) and every caller that builds
token metadata import it; it imports nothing of the package. The mask is computed from per-token arrays,
never from array order:
  positions    [batch, seq]  position inside the token's own document
  segment_ids  [batch, seq]  packed document id (>= 1); 0 = padding / empty slot
  image_ids    [batch, seq]  image slot the token belongs to; -1 for text tokens

  allowed(q, k) = seg_q == seg_k != 0  and  (pos_k <= pos_q  or  img_q == img_k >= 0)

i.e. causal over positions, bidirectional inside each image, isolated per packed document, and padding
never attended.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenInfo(NamedTuple):
  """Per-token metadata from which the mask is derived. All [batch, seq] int32."""
  positions: jax.Array
  segment_ids: jax.Array
  image_ids: jax.Array

  @staticmethod
  def concat(parts, axis: int = 1) -> "TokenInfo":
    return TokenInfo(*(jnp.concatenate(x, axis=axis) for x in zip(*parts)))


def text_info(positions: jax.Array, segment_ids: jax.Array) -> TokenInfo:
  """TokenInfo of text tokens [batch, seq]: image_ids = -1 (no image)."""
  return TokenInfo(positions, segment_ids, jnp.full(positions.shape, -1, jnp.int32))


def image_info(image_positions: jax.Array, image_segment_ids: jax.Array, tokens_per_image: int) -> TokenInfo:
  """TokenInfo of all image slots: [batch, slots] -> [batch, slots * tokens_per_image]. Slot j's tokens sit at
  positions image_positions[:, j] + 0..tokens_per_image-1 and carry image id j."""
  b, n_slots = image_positions.shape
  offs = jnp.arange(tokens_per_image, dtype=jnp.int32)
  pos = (image_positions[:, :, None] + offs).reshape(b, -1)
  seg = jnp.repeat(image_segment_ids, tokens_per_image, axis=1)
  ids = jnp.repeat(jnp.broadcast_to(jnp.arange(n_slots, dtype=jnp.int32), (b, n_slots)), tokens_per_image, axis=1)
  return TokenInfo(pos.astype(jnp.int32), seg.astype(jnp.int32), ids)


def hybrid_mask(q: TokenInfo, k: TokenInfo) -> jax.Array:
  """Boolean mask [batch, q_len, k_len]; True where the query may attend the key."""
  same_doc = (q.segment_ids[:, :, None] == k.segment_ids[:, None, :]) & (k.segment_ids[:, None, :] != 0)
  causal = k.positions[:, None, :] <= q.positions[:, :, None]
  same_image = (q.image_ids[:, :, None] == k.image_ids[:, None, :]) & (q.image_ids[:, :, None] >= 0)
  return same_doc & (causal | same_image)
