"""Llama-3 family text model in Flax NNX (GQA, RMSNorm, SwiGLU, RoPE incl. "llama3" scaling, tied
embeddings). Parameters are stacked over layers; the forward is `decoder.decoder_stack`.

Parameter tree (the `text` branch of LMFusion, and exactly what a Llama checkpoint holds):
  embed [vocab, embed]
  layers/{attn_norm [L, embed], q [L, embed, heads, head_dim], k/v [L, embed, kv_heads, head_dim],
          o [L, heads, head_dim, embed], ffn_norm [L, embed], gate/up [L, embed, mlp], down [L, mlp, embed]}
  final_norm [embed]
  lm_head [embed, vocab]   (absent with tied embeddings)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models import decoder
from lmfusion_jax.models.mask import text_info
from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.models.layers import rms_norm
from lmfusion_jax.models.params import normal, ones, param


def layer_param_shapes(cfg: LlamaConfig) -> dict:
  """name -> (shape, logical names, init kind) for one stacked set of layer weights."""
  Lr, d, h, kvh, hd, f = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  return {
      "attn_norm": ((Lr, d), ("layers", "norm"), "ones"),
      "q": ((Lr, d, h, hd), ("layers", "embed", "heads", "head_dim"), "normal"),
      "k": ((Lr, d, kvh, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "v": ((Lr, d, kvh, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "o": ((Lr, h, hd, d), ("layers", "heads", "head_dim", "embed"), "normal"),
      "ffn_norm": ((Lr, d), ("layers", "norm"), "ones"),
      "gate": ((Lr, d, f), ("layers", "embed", "mlp"), "normal"),
      "up": ((Lr, d, f), ("layers", "embed", "mlp"), "normal"),
      "down": ((Lr, f, d), ("layers", "mlp", "embed"), "normal"),
  }


class LayerStack(nnx.Module):
  """A set of stacked per-layer weights (all of LAYER_KEYS, or the subset `keys`)."""

  def __init__(self, cfg: LlamaConfig, keys=decoder.LAYER_KEYS, *, rngs: nnx.Rngs):
    dtype = cfg.jnp_param_dtype
    for name, (shape, names, init) in layer_param_shapes(cfg).items():
      if name in keys:
        value = ones(shape, dtype) if init == "ones" else normal(rngs, shape, dtype)
        setattr(self, name, param(value, names))

  def arrays(self) -> dict:
    return {k: getattr(self, k)[...] for k in decoder.LAYER_KEYS if hasattr(self, k)}


class Llama(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = cfg.jnp_param_dtype
    self.embed = param(normal(rngs, (cfg.vocab_size, cfg.dim), dtype), ("vocab", "embed"))
    self.layers = LayerStack(cfg, rngs=rngs)
    self.final_norm = param(ones((cfg.dim,), dtype), ("norm",))
    if not cfg.tie_embeddings:
      self.lm_head = param(normal(rngs, (cfg.dim, cfg.vocab_size), dtype), ("embed", "vocab"))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, seq] -> [batch, seq, embed] in the compute dtype."""
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.jnp_dtype)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm + LM head: [batch, seq, embed] -> fp32 [batch, seq, vocab]."""
    h = rms_norm(x, self.final_norm[...], self.cfg.norm_eps)
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return jnp.einsum("bsd,dv->bsv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, cache: Optional[decoder.KVCache] = None,
               attention_impl: Optional[str] = None):
    """tokens [batch, seq] -> (logits fp32 [batch, seq, vocab], (k, v) of these tokens per layer).

    positions default to 0..seq-1 and segment_ids to 1 (one document per row, no padding).
    """
    return self.forward_embedded(self.embed_tokens(tokens), positions, segment_ids, cache, attention_impl)

  def forward_embedded(self, x: jax.Array, positions: Optional[jax.Array] = None,
                       segment_ids: Optional[jax.Array] = None, cache: Optional[decoder.KVCache] = None,
                       attention_impl: Optional[str] = None):
    """As __call__, from embeddings x [batch, seq, embed] (e.g. a LLaVA prompt with image features placed)."""
    b, s = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    spec = decoder.LayerSpec(self.cfg, "none", attention_impl or self.cfg.attention_impl)
    text = decoder.Embedded(x.astype(self.cfg.jnp_dtype), text_info(positions, segment_ids))
    _, x, kv = decoder.decoder_stack(spec, text, None, decoder.LayerWeights(self.layers.arrays(), None), cache)
    return self.logits(x), kv
