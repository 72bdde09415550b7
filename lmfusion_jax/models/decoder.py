"""The transformer stack shared by Llama and LMFusion, as pure functions over stacked layer weights.

Layer weights are stacked along a leading `layers` axis (one checkpoint layout whether or not the stack is
scanned). Routing: every layer receives the image tokens and the text tokens as two separate arrays
(modality-sorted, [image | text]); each goes through its own modality's norms/projections/FFN only,
and the one attention softmax runs over both. No token is processed by both weight sets.

Shapes: x_img [batch, n_img, embed] (n_img may be 0 / None), x_txt [batch, n_txt, embed].
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmfusion_jax import sharding
from lmfusion_jax.models import attention as attn_lib
from lmfusion_jax.models import mask as mask_lib
from lmfusion_jax.models import layers as L
from lmfusion_jax.models.config import LlamaConfig

ATTN_KEYS = ("attn_norm", "q", "k", "v", "o")
FFN_KEYS = ("ffn_norm", "gate", "up", "down")
LAYER_KEYS = ATTN_KEYS + FFN_KEYS

# Which layer weights the image branch owns, per separation mode.
IMAGE_LAYER_KEYS = {"deep": LAYER_KEYS, "shallow": FFN_KEYS, "none": ()}


class KVCache(NamedTuple):
  """Keys/values of tokens already processed. k, v: [layers, batch, cache_len, kv_heads, head_dim];
  info: TokenInfo [batch, cache_len] (segment_ids 0 = empty slot)."""
  k: jax.Array
  v: jax.Array
  info: mask_lib.TokenInfo


def empty_cache(cfg: LlamaConfig, batch: int, length: int, dtype=None) -> KVCache:
  dtype = dtype or cfg.jnp_dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  zeros_i = jnp.zeros((batch, length), jnp.int32)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), mask_lib.text_info(zeros_i, zeros_i))


def write_cache(cache: KVCache, k_new, v_new, info_new: mask_lib.TokenInfo, index) -> KVCache:
  """Writes new tokens' K/V ([layers, batch, n, ...]) into the cache at sequence offset `index`."""
  upd = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=2)
  upd_i = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=1)
  return KVCache(upd(cache.k, k_new), upd(cache.v, v_new),
                 mask_lib.TokenInfo(*(upd_i(c, n) for c, n in zip(cache.info, info_new))))


# Named activations of a layer (jax.ad_checkpoint.checkpoint_name: no-ops unless a remat policy asks for them):
#   "qkv_proj"  q, k, v after their projections (before RoPE)
#   "attn_out"  the attention output (context) before the O projection
#   "out_proj"  the O projection's output
# Remat policies by name (model.remat_policy): "full" saves nothing (recomputes the layer), "dots_saveable" /
# "dots_with_no_batch_dims_saveable" are JAX's, the save_* ones keep the named activations in HBM, and
# offload_qkv_attn moves them to pinned host memory (host offload; refused by compilers without it).
_SAVE_NAMED = {
    "save_qkv_proj": ("qkv_proj",),
    "save_qkv_attn": ("qkv_proj", "attn_out"),
    "save_out_proj": ("out_proj",),
}


def remat_policy(policy: str):
  """The jax.checkpoint policy of a model.remat_policy name other than none/full."""
  cp = jax.checkpoint_policies
  if policy in _SAVE_NAMED:
    return cp.save_only_these_names(*_SAVE_NAMED[policy])
  if policy == "offload_qkv_attn":
    return cp.save_and_offload_only_these_names(names_which_can_be_saved=[],
                                                names_which_can_be_offloaded=["qkv_proj", "attn_out"],
                                                offload_src="device", offload_dst="pinned_host")
  return getattr(cp, policy)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=remat_policy(policy))


def _qkv(h, w, cos, sin):
  dtype = h.dtype
  q = checkpoint_name(jnp.einsum("bsd,dhk->bshk", h, w["q"].astype(dtype)), "qkv_proj")
  k = checkpoint_name(jnp.einsum("bsd,dhk->bshk", h, w["k"].astype(dtype)), "qkv_proj")
  v = checkpoint_name(jnp.einsum("bsd,dhk->bshk", h, w["v"].astype(dtype)), "qkv_proj")
  return L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin), v


def _out(a, w):
  return checkpoint_name(jnp.einsum("bshk,hkd->bsd", a, w["o"].astype(a.dtype)), "out_proj")


def _ffn(x, w, eps):
  return L.swiglu(L.rms_norm(x, w["ffn_norm"], eps), w["gate"], w["up"], w["down"])


def image_layer_weights(text_w: dict, image_w: dict, separation: str) -> dict:
  """The weights image tokens use in one layer: the image copies it owns, text weights for the rest."""
  owned = IMAGE_LAYER_KEYS[separation]
  return {k: (image_w[k] if k in owned else text_w[k]) for k in LAYER_KEYS}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What every layer of a stack shares (static under jit)."""
  cfg: LlamaConfig
  separation: str          # which weights image tokens own: see IMAGE_LAYER_KEYS
  attention_impl: str      # see models/attention.py


class Stream(NamedTuple):
  """One modality's tokens entering a layer: activations [batch, n, embed] and RoPE (cos, sin) tables."""
  x: jax.Array
  rope: tuple


class Embedded(NamedTuple):
  """One modality's tokens entering the stack: activations [batch, n, embed] and their TokenInfo."""
  x: jax.Array
  info: mask_lib.TokenInfo


class LayerWeights(NamedTuple):
  """Text and image layer weights (one layer's, or stacked over layers); image may be None / empty."""
  text: dict
  image: Optional[dict]


def fused_layer(spec: LayerSpec, text: Stream, image: Optional[Stream], weights: LayerWeights,
                info: mask_lib.TokenInfo, cache: Optional[KVCache] = None):
  """One LMFusion layer over [image | text] tokens; `info` is theirs in that order, `cache` (one layer's
  k/v [batch, cache_len, kv_heads, head_dim]) holds earlier tokens both attend to.
  Returns (x_img, x_txt, (k_new, v_new)) with k/v of the [image | text] tokens."""
  eps = spec.cfg.norm_eps
  text_w = weights.text
  has_img = image is not None and image.x.shape[1] > 0
  x_txt = text.x
  h_t = L.rms_norm(x_txt, text_w["attn_norm"], eps)
  q, k, v = _qkv(h_t, text_w, *text.rope)
  x_img = image.x if has_img else None
  if has_img:
    iw = image_layer_weights(text_w, weights.image or {}, spec.separation)
    h_i = L.rms_norm(x_img, iw["attn_norm"], eps)
    q_i, k_i, v_i = _qkv(h_i, iw, *image.rope)
    q = jnp.concatenate([q_i, q], axis=1)
    k = jnp.concatenate([k_i, k], axis=1)
    v = jnp.concatenate([v_i, v], axis=1)
  q = sharding.constrain(q, ("batch", "length", "act_heads", None))
  k_all, v_all, info_k = k, v, info
  if cache is not None:
    k_all = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    info_k = mask_lib.TokenInfo.concat([cache.info, info])
  a = checkpoint_name(attn_lib.dot_product_attention(q, k_all, v_all, info, info_k, spec.attention_impl,
                                                     spec.cfg.attention_tile_fraction), "attn_out")
  if has_img:
    n_img = x_img.shape[1]
    x_img = x_img + _out(a[:, :n_img], iw)
    x_txt = x_txt + _out(a[:, n_img:], text_w)
    x_img = x_img + _ffn(x_img, iw, eps)
  else:
    x_txt = x_txt + _out(a, text_w)
  x_txt = x_txt + _ffn(x_txt, text_w, eps)
  x_txt = sharding.constrain(x_txt, ("batch", "length", "act_embed"))
  if has_img:
    x_img = sharding.constrain(x_img, ("batch", "length", "act_embed"))
  return x_img, x_txt, (k, v)


def decoder_stack(spec: LayerSpec, text: Embedded, image: Optional[Embedded], layers: LayerWeights,
                  cache: Optional[KVCache] = None):
  """Runs all layers (weights stacked on a leading axis). Returns (x_img, x_txt, (k, v)) with k/v
  [layers, batch, n_img + n_txt, kv_heads, head_dim] of the [image | text] tokens."""
  cfg = spec.cfg
  has_img = image is not None and image.x.shape[1] > 0
  rope_txt = L.rope_cos_sin(text.info.positions, cfg)
  rope_img = L.rope_cos_sin(image.info.positions, cfg) if has_img else None
  info_all = mask_lib.TokenInfo.concat([image.info, text.info]) if has_img else text.info
  image_layers = layers.image if (has_img and layers.image) else {}

  def body(carry, per_layer):
    xi, xt = carry
    tw, iw, ckv = per_layer
    layer_cache = KVCache(ckv[0], ckv[1], cache.info) if cache is not None else None
    xi, xt, kv = fused_layer(spec, Stream(xt, rope_txt), Stream(xi, rope_img) if has_img else None,
                             LayerWeights(tw, iw), info_all, layer_cache)
    return (xi, xt), kv

  body = _remat(body, cfg.remat_policy)
  cache_kv = (cache.k, cache.v) if cache is not None else None
  carry = (image.x if has_img else None, text.x)
  if cfg.scan_layers:
    carry, (k, v) = jax.lax.scan(body, carry, (layers.text, image_layers, cache_kv))
  else:
    ks, vs = [], []
    for i in range(cfg.n_layers):
      pick = lambda t: jax.tree.map(lambda a: a[i], t)
      carry, (k_i, v_i) = body(carry, (pick(layers.text), pick(image_layers), pick(cache_kv)))
      ks.append(k_i)
      vs.append(v_i)
    k, v = jnp.stack(ks), jnp.stack(vs)
  return carry[0], carry[1], (k, v)
