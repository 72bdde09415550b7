"""Pure functions shared by the text and image paths: RMSNorm, RoPE (HF rotate-half layout), SwiGLU.

Text and image tokens go through exactly these functions, so a text-only LMFusion forward is the
plain Llama forward operation for operation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lmfusion_jax.models.config import LlamaConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """Llama RMSNorm: normalize in fp32, scale by `weight` in the input dtype (as HF does)."""
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(dtype) * xf.astype(dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with Llama-3.1 "llama3" scaling when configured."""
  hd = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, cfg: LlamaConfig):
  """cos/sin tables for integer positions [batch, seq] -> two [batch, seq, head_dim] fp32 arrays."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [b, s, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [batch, seq, heads, head_dim]; rotate-half layout (no q/k permutation vs HF checkpoints)."""
  dtype = x.dtype
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  c = cos[:, :, None, :].astype(dtype)
  s = sin[:, :, None, :].astype(dtype)
  return x * c + rotated * s


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """x [.., embed] -> [.., embed]; gate/up [embed, mlp], down [mlp, embed]."""
  dtype = x.dtype
  g = jnp.einsum("...d,df->...f", x, gate.astype(dtype))
  u = jnp.einsum("...d,df->...f", x, up.astype(dtype))
  return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, down.astype(dtype))
