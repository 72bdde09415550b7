"""LMFusion: a Llama text tower (`text`, frozen in the main recipe) plus an image branch (`image`).

Parameter tree (two top-level branches, nothing else):
  text:  exactly the Llama tree (see llama.py)
  image: layers/{...}  per-layer image copies; which ones depends on the separation mode:
                       deep = attn_norm, q, k, v, o, ffn_norm, gate, up, down; shallow = ffn_norm + FFN;
                       none = nothing (image tokens use the text weights)
         final_norm    image-path final RMSNorm (a copy of the text one)
         io/...        U-Net (or linear patchify) in/out modules with the timestep embedding

Forward (`LMFusion.__call__(TextInputs, ImageInputs)`): text tokens -> Llama embedding; noisy latents -> io.encode -> image tokens; both go through the
routed decoder (decoder.decoder_stack) as [image | text]; text -> final norm + LM head -> logits; image ->
image final norm -> io.decode -> predicted noise.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models import decoder
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.image_io import make_image_io
from lmfusion_jax.models.layers import rms_norm
from lmfusion_jax.models.llama import LayerStack, Llama
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.models.params import ones, param


class ImageBranch(nnx.Module):
  def __init__(self, lcfg: LlamaConfig, fcfg: FusionConfig, *, rngs: nnx.Rngs):
    keys = decoder.IMAGE_LAYER_KEYS[fcfg.separation]
    self.layers = LayerStack(lcfg, keys, rngs=rngs)
    self.final_norm = param(ones((lcfg.dim,), lcfg.jnp_param_dtype), ("norm",))
    self.io = make_image_io(lcfg, fcfg, rngs=rngs)


class LMFusion(nnx.Module):
  def __init__(self, lcfg: LlamaConfig, fcfg: FusionConfig, *, rngs: nnx.Rngs):
    self.lcfg, self.fcfg = lcfg, fcfg
    self.text = Llama(lcfg, rngs=rngs)
    self.image = ImageBranch(lcfg, fcfg, rngs=rngs)
    if fcfg.image_init == "copy":
      copy_text_into_image(self)
    io_state = nnx.state(self.image.io)
    nnx.replace_by_pure_dict(io_state, match_token_scale(nnx.to_pure_dict(io_state), fcfg,
                                                       embed_rms(self.text.embed[...])))
    nnx.update(self.image.io, io_state)

  def __call__(self, text: TextInputs, image: Optional[ImageInputs] = None,
               cache: Optional[decoder.KVCache] = None, attention_impl: Optional[str] = None):
    """Routed forward over a packed batch (see data/batch.py): text tokens [B, T] through the text weights,
    noisy latents [B, I, H, W, C] at their timesteps through the image weights, one shared attention.
    Returns (text logits fp32 [B, T, V], predicted noise fp32 [B, I, H, W, C] (None without `image`),
    (k, v) [L, B, I*N + T, kv_heads, head_dim] of the [image | text] tokens)."""
    lcfg, fcfg = self.lcfg, self.fcfg
    dtype = lcfg.jnp_dtype
    spec = decoder.LayerSpec(lcfg, fcfg.separation, attention_impl or lcfg.attention_impl)
    b = text.tokens.shape[0]
    n_slots = image.num_slots if image is not None else 0
    n_tok = fcfg.tokens_per_image
    txt = decoder.Embedded(self.text.embed_tokens(text.tokens), text.info())
    img, skips, temb = None, None, None
    if n_slots:
      lat = image.latents.reshape((b * n_slots,) + image.latents.shape[2:])
      img_tok, skips, temb = self.image.io.encode(lat, image.timesteps.reshape(-1), dtype)  # [B*I, N, D]
      img = decoder.Embedded(img_tok.reshape(b, n_slots * n_tok, -1).astype(dtype), image.info(n_tok))
    weights = decoder.LayerWeights(self.text.layers.arrays(), self.image.layers.arrays())
    x_img, x_txt, kv = decoder.decoder_stack(spec, txt, img, weights, cache)
    logits = self.text.logits(x_txt)
    if n_slots:
      h = rms_norm(x_img, self.image.final_norm[...], lcfg.norm_eps).reshape(b * n_slots, n_tok, -1)
      eps = self.image.io.decode(h, skips, temb).reshape(image.latents.shape)
    else:
      eps = None if image is None else jnp.zeros(image.latents.shape, jnp.float32)
    return logits, eps, kv


def copy_text_into_image(model: LMFusion) -> None:
  """Image layer weights and final norm start as copies of the text weights (LMFusion init)."""
  for k, v in model.image.layers.arrays().items():
    getattr(model.image.layers, k)[...] = jnp.array(model.text.layers.arrays()[k], copy=True)
  model.image.final_norm[...] = jnp.array(model.text.final_norm[...], copy=True)


# The io parameters that produce image tokens (what enters the residual stream).
TOKEN_PROJECTIONS = {"unet": ("to_tokens",), "linear": ("patchify", "time_to_embed")}


def embed_rms(text_embed) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(text_embed, jnp.float32))))


def match_token_scale(io_params: dict, fcfg: FusionConfig, rms) -> dict:
  """Scales the freshly initialized token projections so image tokens enter the residual stream at the
  RMS of the text embeddings (a Llama's embeddings are ~0.01-0.02 per dim; unit-scale image tokens would
  drown every layer's update and the caption's influence on the image). Pure; returns a new dict."""
  out = dict(io_params)
  for name in TOKEN_PROJECTIONS[fcfg.image_io]:
    out[name] = {k: (v * rms).astype(v.dtype) for k, v in io_params[name].items()}
  return out


def init_image_params(lcfg: LlamaConfig, fcfg: FusionConfig, text_params: dict, seed: int = 0,
                      text_embed_rms=None) -> dict:
  """Pure-dict `image` branch for given `text` params: copies of the text layers (or random ones when
  fcfg.image_init == "random") and a fresh io module. Does not build a second text tower."""
  rngs = nnx.Rngs(seed)
  keys = decoder.IMAGE_LAYER_KEYS[fcfg.separation]
  if fcfg.image_init == "copy":
    layers = {k: jnp.array(text_params["layers"][k], copy=True) for k in keys}
  else:
    layers = nnx.to_pure_dict(nnx.state(LayerStack(lcfg, keys, rngs=rngs)))
  io = nnx.to_pure_dict(nnx.state(make_image_io(lcfg, fcfg, rngs=rngs)))
  rms = embed_rms(text_params["embed"]) if text_embed_rms is None else text_embed_rms
  io = match_token_scale(io, fcfg, rms)
  out = {"final_norm": jnp.array(text_params["final_norm"], copy=True), "io": io}
  if layers:  # separation "none" owns no layer weights: the model's image tree then has no `layers`
    out["layers"] = layers
  return out
