"""The Stable-Diffusion-style AutoencoderKL (encoder + decoder) in Flax NNX, NHWC.

Numerically matches diffusers' `AutoencoderKL` (torch) for the standard SD layout, so a diffusers
checkpoint converts tensor for tensor (`lmfusion_jax.convert.diffusers_vae`). The module tree mirrors
diffusers' names (encoder/down_blocks/0/resnets/1/conv1/kernel ...); only leaves differ: convolution
kernels are HWIO `kernel` [kh, kw, in, out], GroupNorm weights are `scale`, linear weights are [in, out].

  encoder:  conv_in -> down blocks (ResnetBlock2D x layers_per_block, Downsample2D except the last)
            -> mid (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU -> conv_out (2*latent)
  quant_conv (1x1, optional) -> (mean, logvar)
  post_quant_conv (1x1, optional) -> decoder: conv_in -> mid -> up blocks (ResnetBlock2D x
            (layers_per_block + 1), nearest 2x Upsample2D + conv except the last) -> GroupNorm, SiLU -> conv_out

Public functions: `encode`, `decode` (raw latents), `encode_latents` / `decode_latents` (scaled latents,
what the diffusion model sees: (z - shift_factor) * scaling_factor), `to_model_range` / `to_model_range_on_device` (uint8 -> [-1, 1]).
`EncoderOnly(vae)` holds just the encoder half (encoder + quant_conv, the same parameter paths): `encode` and
`encode_latents` take it in place of the whole VAE (the train step's online encoding).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.models.config import DTYPES, ConfigError
from lmfusion_jax.models.nn import Conv, Dense, GroupNorm

GROUPNORM_EPS = 1e-6     # diffusers uses 1e-6 for every GroupNorm of the VAE
LOGVAR_CLAMP = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL hyper-parameters (the fields of a diffusers config.json we support)."""
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  sample_size: int = 256
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"          # compute dtype (GroupNorm and softmax always run in fp32)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ConfigError("vae.block_out_channels is empty")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"vae.block_out_channels={self.block_out_channels}: {c} is not divisible by "
                          f"vae.norm_num_groups={self.norm_num_groups}")
    if self.layers_per_block < 1:
      raise ConfigError(f"vae.layers_per_block={self.layers_per_block} must be >= 1")
    if self.param_dtype not in DTYPES:
      raise ConfigError(f"vae.param_dtype={self.param_dtype!r}: expected one of {sorted(DTYPES)}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"vae.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def replace(self, **kw) -> "VAEConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @classmethod
  def from_dict(cls, d: dict, source: str = "vae config") -> "VAEConfig":
    """Inverse of `to_dict` (our own JSON); unknown fields raise naming them."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError(f"{source}: unknown VAE config field(s) {unknown}")
    return cls(**d)


# --- layers ------------------------------------------------------------------------------------------

def _conv(cin: int, cout: int, k: int, cfg: VAEConfig, *, rngs: nnx.Rngs) -> Conv:
  return Conv(cin, cout, DTYPES[cfg.param_dtype], rngs=rngs, kernel=k, init="normal")


def _linear(cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs) -> Dense:
  """Dense layer over the last axis, kernel [in, out] (the mid-block attention projections)."""
  return Dense(cin, cout, ("conv_in", "conv_out"), DTYPES[cfg.param_dtype], rngs=rngs, init="normal")


def _group_norm(channels: int, cfg: VAEConfig) -> GroupNorm:
  return GroupNorm(channels, cfg.norm_num_groups, DTYPES[cfg.param_dtype], GROUPNORM_EPS)


class ResnetBlock2D(nnx.Module):
  """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus a 1x1 shortcut conv when channels change."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.norm1 = _group_norm(cin, cfg)
    self.conv1 = _conv(cin, cout, 3, cfg, rngs=rngs)
    self.norm2 = _group_norm(cout, cfg)
    self.conv2 = _conv(cout, cout, 3, cfg, rngs=rngs)
    self.conv_shortcut = _conv(cin, cout, 1, cfg, rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class Downsample2D(nnx.Module):
  """diffusers' Downsample2D with padding=0: zero-pad right/bottom by one, then a stride-2 3x3 conv."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [b, h, w, c] -> [b, h/2, w/2, c]
    return self.conv(x, stride=2, padding=((0, 1), (0, 1)))


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [b, h, w, c] -> [b, 2h, 2w, c]
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class SpatialSelfAttention(nnx.Module):
  """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.group_norm = _group_norm(channels, cfg)
    self.to_q = _linear(channels, channels, cfg, rngs=rngs)
    self.to_k = _linear(channels, channels, cfg, rngs=rngs)
    self.to_v = _linear(channels, channels, cfg, rngs=rngs)
    self.to_out = _linear(channels, channels, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)  # [b, hw, c]
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """resnet -> (attention) -> resnet at the lowest resolution."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List(
        [SpatialSelfAttention(channels, cfg, rngs=rngs)] if cfg.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, num_resnets: int, downsample: bool, cfg: VAEConfig, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                             for i in range(num_resnets)])
    self.downsamplers = nnx.List([Downsample2D(cout, cfg, rngs=rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, num_resnets: int, upsample: bool, cfg: VAEConfig, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                             for i in range(num_resnets)])
    self.upsamplers = nnx.List([Upsample2D(cout, cfg, rngs=rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, ch[0], 3, cfg, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, cfg, rngs=rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
    self.conv_norm_out = _group_norm(ch[-1], cfg)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [b, H, W, in] -> [b, H/f, W/f, 2*latent]
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    rev = tuple(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, rev[0], 3, cfg, rngs=rngs)
    self.mid_block = MidBlock(rev[0], cfg, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i < len(rev) - 1, cfg, rngs=rngs)
        for i in range(len(rev))])
    self.conv_norm_out = _group_norm(rev[-1], cfg)
    self.conv_out = _conv(rev[-1], cfg.out_channels, 3, cfg, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:  # [b, h, w, latent] -> [b, h*f, w*f, out]
    x = self.conv_in(z)
    x = self.mid_block(x)
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Parameters of the VAE; use the module-level functions below to run it."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = _conv(2 * c, 2 * c, 1, cfg, rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(c, c, 1, cfg, rngs=rngs) if cfg.use_post_quant_conv else None


class EncoderOnly(nnx.Module):
  """The encoder half of an AutoencoderKL (its modules, not copies): what `encode` / `encode_latents` use."""

  def __init__(self, vae: AutoencoderKL):
    self.cfg = vae.cfg
    self.encoder = vae.encoder
    self.quant_conv = vae.quant_conv


# --- public functions ----------------------------------------------------------------------------------

def to_model_range(pixels) -> np.ndarray:
  """8-bit pixels (host, uint8 [..., 3]) -> float32 in [-1, 1]: x / 127.5 - 1, the expression build-data and
  prepare-data use."""
  return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_model_range_on_device(pixels: jax.Array) -> jax.Array:
  """`to_model_range` inside a jitted program, bitwise: each byte value selects its one of the 256 host-computed
  values (XLA's float division differs from numpy's in the last bit for about half the byte values). A compare +
  select + sum over the 256 values, fused by XLA: exact (one non-zero term), and ~46 us for 16 256x256 images on a
  v5p chip by the compiler's estimate, where a gather (jnp.take) from the same table is estimated at 235 ms."""
  table = jnp.asarray(to_model_range(np.arange(256, dtype=np.uint8)))          # [256]
  hit = pixels[..., None].astype(jnp.int32) == jnp.arange(256, dtype=jnp.int32)  # [..., 256]
  return jnp.sum(jnp.where(hit, table, jnp.zeros((), jnp.float32)), axis=-1)


def encode(vae: AutoencoderKL | EncoderOnly, images: jax.Array):
  """images [batch, H, W, in_channels] in [-1, 1] -> (mean, logvar), each fp32 [batch, H/f, W/f, latent].

  logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
  """
  x = images.astype(DTYPES[vae.cfg.dtype])
  moments = vae.encoder(x)
  if vae.quant_conv is not None:
    moments = vae.quant_conv(moments)
  moments = moments.astype(jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_CLAMP)


def decode(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """Raw (unscaled) latents [batch, h, w, latent] -> fp32 images [batch, h*f, w*f, out_channels] (~[-1, 1])."""
  z = latents.astype(DTYPES[vae.cfg.dtype])
  if vae.post_quant_conv is not None:
    z = vae.post_quant_conv(z)
  return vae.decoder(z).astype(jnp.float32)


def encode_latents(vae: AutoencoderKL | EncoderOnly, images: jax.Array,
                   rng: Optional[jax.Array] = None) -> jax.Array:
  """images [batch, H, W, 3] in [-1, 1] -> scaled latents (z - shift_factor) * scaling_factor, fp32.

  z is the posterior mean when `rng` is None, else a sample mean + exp(logvar / 2) * N(0, 1).
  """
  mean, logvar = encode(vae, images)
  z = mean
  if rng is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
  return scale_latents(vae.cfg, z)


def decode_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
  """Scaled latents (as produced by `encode_latents`) [batch, h, w, latent] -> images [batch, H, W, 3]."""
  return decode(vae, unscale_latents(vae.cfg, latents))


def scale_latents(cfg: VAEConfig, z: jax.Array) -> jax.Array:
  shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
  return (z - shift) * cfg.scaling_factor


def unscale_latents(cfg: VAEConfig, latents: jax.Array) -> jax.Array:
  shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
  return latents.astype(jnp.float32) / cfg.scaling_factor + shift


def jit_encode_latents(vae: AutoencoderKL):
  """A compiled `images, rng=None -> scaled latents` function over a split copy of `vae`'s state."""
  graphdef, state = nnx.split(vae)
  fn = jax.jit(lambda st, images, rng: encode_latents(nnx.merge(graphdef, st), images, rng))
  return lambda images, rng=None: fn(state, images, rng)


def jit_decode_latents(vae: AutoencoderKL):
  """A compiled `scaled latents -> images` function over a split copy of `vae`'s state."""
  graphdef, state = nnx.split(vae)
  fn = jax.jit(lambda st, latents: decode_latents(nnx.merge(graphdef, st), latents))
  return lambda latents: fn(state, latents)
