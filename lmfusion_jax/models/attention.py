"""Attention behind one function: the XLA reference and the Pallas flash kernel, both computing the hybrid
LMFusion mask of models/mask.py from per-token metadata.

`dot_product_attention` dispatches to the reference (plain XLA, runs anywhere) or the Pallas
TPU flash kernel (models/flash_attention.py: the mask is built per tile, never materialized), both behind
the same signature; `model.attention_impl` picks one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmfusion_jax.models.flash_attention import flash_attention
from lmfusion_jax.models.mask import TokenInfo, hybrid_mask
from lmfusion_jax.errors import UserError


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
  def run(q, k, v, q_info, k_info, tile_fraction: float = 1.0):
    return flash_attention(q, k, v, q_info, k_info, interpret=interpret, tile_fraction=tile_fraction)
  run.takes_tile_fraction = True   # its cost estimate takes model.attention_tile_fraction
  return run


# name -> fn(q, k, v, q_info, k_info); every implementation computes the same function.
_IMPLEMENTATIONS = {"xla": xla_attention, "flash": _flash(False), "flash_interpret": _flash(True)}


def register_attention(name: str, fn) -> None:
  """Registers a kernel with `xla_attention`'s signature (q, k, v, q_info, k_info)."""
  _IMPLEMENTATIONS[name] = fn


def dot_product_attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, implementation: str = "xla",
                          tile_fraction: float = 1.0):
  """The one attention entry point used by every layer (model.attention_impl picks the implementation;
  model.attention_tile_fraction goes to the block-sparse flash kernel's cost estimate)."""
  if implementation not in _IMPLEMENTATIONS:
    raise UserError(f"attention implementation {implementation!r} unknown (have {sorted(_IMPLEMENTATIONS)})")
  fn = _IMPLEMENTATIONS[implementation]
  if getattr(fn, "takes_tile_fraction", False):
    return fn(q, k, v, q_info, k_info, tile_fraction=tile_fraction)
  return fn(q, k, v, q_info, k_info)
