"""Image in/out modules: latents <-> image tokens, with the diffusion timestep as input.

Two choices (FusionConfig.image_io):
  unet:   a small U-Net downsampler (ResBlocks with an added timestep embedding, GroupNorm, one 2x
          downsample per extra level) maps latents [n, H, W, C] to tokens [n, (H/p)*(W/p), embed] and keeps
          its per-level features; the upsampler takes the transformer's output tokens plus those skip
          features and predicts the noise eps [n, H, W, C]. (LMFusion / Transfusion.) With
          fusion.unet_skips=False the upsampler reads only the transformer's tokens: it cannot denoise
          around the transformer, so the caption has to matter for the prediction to improve.
  linear: linear patchify (p x p patches -> embed) plus a timestep embedding added to every patch, and a
          linear unpatchify. (Transfusion's cheaper variant.)
Tokens are in row-major patch order. Everything runs in the model's compute dtype; GroupNorm in fp32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.nn import Conv, Dense, GroupNorm


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps [n] -> fp32 [n, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nnx.Module):
  def __init__(self, dim, dtype, *, rngs):
    self.dim = dim
    self.fc1 = Dense(dim, dim, ("time", "time"), dtype, rngs=rngs)
    self.fc2 = Dense(dim, dim, ("time", "time"), dtype, rngs=rngs)

  def __call__(self, t, dtype):
    return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.dim).astype(dtype))))


class ResBlock(nnx.Module):
  def __init__(self, c_in, c_out, t_dim, groups, dtype, *, rngs):
    self.norm1 = GroupNorm(c_in, groups, dtype)
    self.conv1 = Conv(c_in, c_out, dtype, rngs=rngs)
    self.time = Dense(t_dim, c_out, ("time", "conv_out"), dtype, rngs=rngs)
    self.norm2 = GroupNorm(c_out, groups, dtype)
    self.conv2 = Conv(c_out, c_out, dtype, rngs=rngs)
    self.skip = Conv(c_in, c_out, dtype, rngs=rngs, kernel=1) if c_in != c_out else None

  def __call__(self, x, temb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.time(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return h + (self.skip(x) if self.skip is not None else x)


class UNetIO(nnx.Module):
  """U-Net down (latents -> tokens, skips) and up (tokens, skips -> eps)."""

  def __init__(self, lcfg: LlamaConfig, fcfg: FusionConfig, *, rngs: nnx.Rngs):
    dtype = lcfg.jnp_param_dtype
    ch, nb, g, td = fcfg.unet_channels, fcfg.unet_blocks, fcfg.unet_groups, fcfg.time_embed_dim
    self.use_skips = fcfg.unet_skips
    self.time_embed = TimeEmbedding(td, dtype, rngs=rngs)
    self.conv_in = Conv(fcfg.latent_channels, ch[0], dtype, rngs=rngs)
    down, downsample = [], []
    c = ch[0]
    for lvl, width in enumerate(ch):
      blocks = []
      for _ in range(nb):
        blocks.append(ResBlock(c, width, td, g, dtype, rngs=rngs))
        c = width
      down.append(nnx.List(blocks))
      if lvl < len(ch) - 1:
        downsample.append(Conv(c, c, dtype, rngs=rngs, stride=2))
    self.down = nnx.List(down)
    self.downsample = nnx.List(downsample)
    self.to_tokens_norm = GroupNorm(c, g, dtype)
    self.to_tokens = Dense(c, lcfg.dim, ("conv_in", "embed"), dtype, rngs=rngs)
    self.from_tokens = Dense(lcfg.dim, c, ("embed", "conv_out"), dtype, rngs=rngs)
    up, upsample = [], []
    for lvl in reversed(range(len(ch))):
      width = ch[lvl]
      blocks = []
      for j in range(nb):
        blocks.append(ResBlock(c + (width if j == 0 and self.use_skips else 0), width, td, g, dtype, rngs=rngs))
        c = width
      up.append(nnx.List(blocks))
      if lvl > 0:
        upsample.append(Conv(c, ch[lvl - 1], dtype, rngs=rngs))
        c = ch[lvl - 1]
    self.up = nnx.List(up)
    self.upsample = nnx.List(upsample)
    self.out_norm = GroupNorm(c, g, dtype)
    self.conv_out = Conv(c, fcfg.latent_channels, dtype, rngs=rngs, init="zeros")

  def encode(self, latents, t, dtype):
    """latents [n, H, W, C], t [n] -> (tokens [n, h*w, embed], skips, temb)."""
    temb = self.time_embed(t, dtype)
    x = self.conv_in(latents.astype(dtype))
    skips = []
    for lvl, blocks in enumerate(self.down):
      for blk in blocks:
        x = blk(x, temb)
      skips.append(x)
      if lvl < len(self.downsample):
        x = self.downsample[lvl](x)
    n, h, w, c = x.shape
    tokens = self.to_tokens(jax.nn.silu(self.to_tokens_norm(x))).reshape(n, h * w, -1)
    return tokens, skips, temb

  def decode(self, hidden, skips, temb):
    """hidden [n, h*w, embed] -> eps [n, H, W, C] (fp32)."""
    n, hw, _ = hidden.shape
    side = int(round(math.sqrt(hw)))
    x = self.from_tokens(hidden).reshape(n, side, side, -1)
    for i, blocks in enumerate(self.up):
      lvl = len(self.up) - 1 - i
      if self.use_skips:
        x = jnp.concatenate([x, skips[lvl].astype(x.dtype)], axis=-1)
      for blk in blocks:
        x = blk(x, temb)
      if i < len(self.upsample):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = self.upsample[i](x)
    return self.conv_out(jax.nn.silu(self.out_norm(x))).astype(jnp.float32)


class LinearIO(nnx.Module):
  """Linear patchify/unpatchify with an added timestep embedding."""

  def __init__(self, lcfg: LlamaConfig, fcfg: FusionConfig, *, rngs: nnx.Rngs):
    dtype = lcfg.jnp_param_dtype
    self.p = fcfg.patch_size
    pdim = self.p * self.p * fcfg.latent_channels
    self.time_embed = TimeEmbedding(fcfg.time_embed_dim, dtype, rngs=rngs)
    self.time_to_embed = Dense(fcfg.time_embed_dim, lcfg.dim, ("time", "embed"), dtype, rngs=rngs)
    self.patchify = Dense(pdim, lcfg.dim, ("patch", "embed"), dtype, rngs=rngs)
    self.unpatchify = Dense(lcfg.dim, pdim, ("embed", "patch"), dtype, rngs=rngs, init="zeros")

  def encode(self, latents, t, dtype):
    n, hh, ww, c = latents.shape
    p = self.p
    x = latents.astype(dtype).reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (hh // p) * (ww // p), p * p * c)
    temb = self.time_embed(t, dtype)
    tokens = self.patchify(x) + self.time_to_embed(jax.nn.silu(temb))[:, None, :]
    return tokens, (hh, ww, c), temb

  def decode(self, hidden, shape, temb):
    del temb
    hh, ww, c = shape
    p = self.p
    n = hidden.shape[0]
    x = self.unpatchify(hidden).reshape(n, hh // p, ww // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hh, ww, c).astype(jnp.float32)


def make_image_io(lcfg: LlamaConfig, fcfg: FusionConfig, *, rngs: nnx.Rngs):
  return UNetIO(lcfg, fcfg, rngs=rngs) if fcfg.image_io == "unet" else LinearIO(lcfg, fcfg, rngs=rngs)
