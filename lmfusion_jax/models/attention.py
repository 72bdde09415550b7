"""The hybrid LMFusion attention mask and the attention kernel behind one function.

Which key a query may see is computed from per-token arrays, never from array order:
  positions    [batch, seq]  position inside the token's own document
  segment_ids  [batch, seq]  packed document id (>= 1); 0 = padding / empty slot
  image_ids    [batch, seq]  image slot the token belongs to; -1 for text tokens

  allowed(q, k) = seg_q == seg_k != 0  and  (pos_k <= pos_q  or  img_q == img_k >= 0)

i.e. causal over positions, bidirectional inside each image, isolated per packed document, and padding
never attended. `dot_product_attention` dispatches to the reference (plain XLA, runs anywhere) or the Pallas
TPU flash kernel (models/flash_attention.py: the mask is built per tile, never materialized), both behind
the same signature; `model.attention_impl` picks one.
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


def hybrid_mask(q: TokenInfo, k: TokenInfo) -> jax.Array:
  """Boolean mask [batch, q_len, k_len]; True where the query may attend the key."""
  same_doc = (q.segment_ids[:, :, None] == k.segment_ids[:, None, :]) & (k.segment_ids[:, None, :] != 0)
  causal = k.positions[:, None, :] <= q.positions[:, :, None]
  same_image = (q.image_ids[:, :, None] == k.image_ids[:, None, :]) & (q.image_ids[:, :, None] >= 0)
  return same_doc & (causal | same_image)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention in XLA.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim]; mask [batch, q_len, k_len].
  Logits and softmax in fp32. A query with no allowed key (padding) gets zeros, never NaN.
  """
  b, tq, h, d = q.shape
  kvh = k.shape[2]
  g = h // kvh
  qg = q.reshape(b, tq, kvh, g, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
  m = mask[:, None, None, :, :]
  logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(m, probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, tq, h, d)


def xla_attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo) -> jax.Array:
  """The reference: the full [batch, q_len, k_len] mask and fp32 scores, in XLA."""
  return reference_attention(q, k, v, hybrid_mask(q_info, k_info))


def _flash(interpret: bool):
  def run(q, k, v, q_info, k_info):
    from lmfusion_jax.models.flash_attention import flash_attention   # Pallas: imported when used
    return flash_attention(q, k, v, q_info, k_info, interpret=interpret)
  return run


# name -> fn(q, k, v, q_info, k_info); every implementation computes the same function.
_IMPLEMENTATIONS = {"xla": xla_attention, "flash": _flash(False), "flash_interpret": _flash(True)}


def register_attention(name: str, fn) -> None:
  """Registers a kernel with `xla_attention`'s signature (q, k, v, q_info, k_info)."""
  _IMPLEMENTATIONS[name] = fn


def dot_product_attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, implementation: str = "xla"):
  """The one attention entry point used by every layer (model.attention_impl picks the implementation)."""
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} unknown (have {sorted(_IMPLEMENTATIONS)})")
  return _IMPLEMENTATIONS[implementation](q, k, v, q_info, k_info)
