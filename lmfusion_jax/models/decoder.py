"""The transformer stack shared by Llama and LMFusion, as pure functions over stacked layer weights.

Layer weights are stacked along a leading `layers` axis (one checkpoint layout whether or not the stack is
scanned). Routing: every layer receives the image tokens and the text tokens as two separate arrays
(modality-sorted, [image | text]); each goes through its own modality's norms/projections/FFN only,
and the one attention softmax runs over both. No token is processed by both weight sets.

Shapes: x_img [batch, n_img, embed] (n_img may be 0 / None), x_txt [batch, n_txt, embed].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lmfusion_jax import sharding
from lmfusion_jax.models import attention as attn_lib
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
  info: attn_lib.TokenInfo


def empty_cache(cfg: LlamaConfig, batch: int, length: int, dtype=None) -> KVCache:
  dtype = dtype or cfg.jnp_dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  zeros_i = jnp.zeros((batch, length), jnp.int32)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 attn_lib.TokenInfo(zeros_i, zeros_i, zeros_i - 1))


def write_cache(cache: KVCache, k_new, v_new, info_new: attn_lib.TokenInfo, index) -> KVCache:
  """Writes new tokens' K/V ([layers, batch, n, ...]) into the cache at sequence offset `index`."""
  upd = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=2)
  upd_i = lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), index, axis=1)
  return KVCache(upd(cache.k, k_new), upd(cache.v, v_new),
                 attn_lib.TokenInfo(*(upd_i(c, n) for c, n in zip(cache.info, info_new))))


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def _qkv(h, w, cos, sin):
  dtype = h.dtype
  q = jnp.einsum("bsd,dhk->bshk", h, w["q"].astype(dtype))
  k = jnp.einsum("bsd,dhk->bshk", h, w["k"].astype(dtype))
  v = jnp.einsum("bsd,dhk->bshk", h, w["v"].astype(dtype))
  return L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin), v


def _out(a, w):
  return jnp.einsum("bshk,hkd->bsd", a, w["o"].astype(a.dtype))


def _ffn(x, w, eps):
  return L.swiglu(L.rms_norm(x, w["ffn_norm"], eps), w["gate"], w["up"], w["down"])


def image_layer_weights(text_w: dict, image_w: dict, separation: str) -> dict:
  """The weights image tokens use in one layer: the image copies it owns, text weights for the rest."""
  owned = IMAGE_LAYER_KEYS[separation]
  return {k: (image_w[k] if k in owned else text_w[k]) for k in LAYER_KEYS}


def fused_layer(cfg: LlamaConfig, separation: str, attention_impl: str,
                x_img: Optional[jax.Array], x_txt: jax.Array, text_w: dict, image_w: Optional[dict],
                rope_img, rope_txt, info_all: attn_lib.TokenInfo, cache_kv=None, cache_info=None):
  """One LMFusion layer. Returns (x_img, x_txt, (k_new, v_new)) with k/v of [image | text] tokens."""
  eps = cfg.norm_eps
  has_img = x_img is not None and x_img.shape[1] > 0
  h_t = L.rms_norm(x_txt, text_w["attn_norm"], eps)
  q, k, v = _qkv(h_t, text_w, *rope_txt)
  if has_img:
    iw = image_layer_weights(text_w, image_w or {}, separation)
    h_i = L.rms_norm(x_img, iw["attn_norm"], eps)
    q_i, k_i, v_i = _qkv(h_i, iw, *rope_img)
    q = jnp.concatenate([q_i, q], axis=1)
    k = jnp.concatenate([k_i, k], axis=1)
    v = jnp.concatenate([v_i, v], axis=1)
  q = sharding.constrain(q, ("batch", "length", "act_heads", None))
  k_all, v_all, info_k = k, v, info_all
  if cache_kv is not None:
    k_all = jnp.concatenate([cache_kv[0].astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([cache_kv[1].astype(v.dtype), v], axis=1)
    info_k = attn_lib.TokenInfo.concat([cache_info, info_all])
  a = attn_lib.dot_product_attention(q, k_all, v_all, info_all, info_k, attention_impl)
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


def decoder_stack(cfg: LlamaConfig, separation: str, text_layers: dict, image_layers: Optional[dict],
                  x_img: Optional[jax.Array], x_txt: jax.Array,
                  info_img: Optional[attn_lib.TokenInfo], info_txt: attn_lib.TokenInfo,
                  cache: Optional[KVCache] = None, attention_impl: Optional[str] = None):
  """Runs all layers. Returns (x_img, x_txt, (k, v)) with k/v [layers, batch, n_img + n_txt, kvh, hd]."""
  has_img = x_img is not None and x_img.shape[1] > 0
  attention_impl = attention_impl or cfg.attention_impl
  rope_txt = L.rope_cos_sin(info_txt.positions, cfg)
  rope_img = L.rope_cos_sin(info_img.positions, cfg) if has_img else None
  info_all = attn_lib.TokenInfo.concat([info_img, info_txt]) if has_img else info_txt
  image_layers = image_layers if (has_img and image_layers) else {}

  def body(carry, per_layer):
    xi, xt = carry
    tw, iw, ckv = per_layer
    xi, xt, kv = fused_layer(cfg, separation, attention_impl, xi, xt, tw, iw, rope_img, rope_txt,
                             info_all, ckv, cache.info if cache is not None else None)
    return (xi, xt), kv

  body = _remat(body, cfg.remat_policy)
  cache_kv = (cache.k, cache.v) if cache is not None else None
  carry = (x_img if has_img else None, x_txt)
  if cfg.scan_layers:
    carry, (k, v) = jax.lax.scan(body, carry, (text_layers, image_layers, cache_kv))
  else:
    ks, vs = [], []
    for i in range(cfg.n_layers):
      pick = lambda t: jax.tree.map(lambda a: a[i], t)
      carry, (k_i, v_i) = body(carry, (pick(text_layers), pick(image_layers), pick(cache_kv)))
      ks.append(k_i)
      vs.append(v_i)
    k, v = jnp.stack(ks), jnp.stack(vs)
  return carry[0], carry[1], (k, v)
