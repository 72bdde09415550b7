"""What encoding images with the VAE costs on a TPU: the encoder (`models.vae.encode_latents` on the encoder half)
compiled ahead of time for a topology from shapes only, its compiler cost estimate, and an analytic FLOP count
to check the compiled one against.

  encoder_flops(cfg, image_size)                   forward FLOPs of one image (convolutions, 1x1 shortcuts,
                                                   the mid-block attention), 2 per multiply-add
  encoder_cost(cfg, devices, image_size, batch_per_device)
                                                   {flops_per_image, seconds, images_per_s_per_device, ...}

The batch is split over the devices along one "data" axis and the VAE is replicated (as prepare-data runs it);
per-device figures are what one chip does. GroupNorm, SiLU and softmax are elementwise and not counted
analytically (a few per cent of the total); the compiled count includes them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmfusion_jax.models.vae import VAEConfig


def _conv(h: int, w: int, k: int, cin: int, cout: int, padding: bool) -> float:
  """A stride-1 'same' k x k convolution (k = 1 or 3): 2 x taps x cin x cout; without `padding` only the
  in-bounds taps, 3n - 2 along a side of n (XLA's count), with it k per output position (torch's)."""
  taps = (lambda n: n * k) if padding or k == 1 else (lambda n: 3 * n - 2)
  return 2.0 * taps(h) * taps(w) * cin * cout


def _downsample(h: int, w: int, c: int, padding: bool) -> float:
  """diffusers' Downsample2D: input padded by one at the right / bottom, stride-2 3x3 convolution, output side
  n/2; in-bounds taps 3 * n/2 - 1 along a side."""
  taps = (lambda n: 3 * (n // 2)) if padding else (lambda n: 3 * (n // 2) - 1)
  return 2.0 * taps(h) * taps(w) * c * c


def _resnet(h: int, w: int, cin: int, cout: int, padding: bool) -> float:
  f = _conv(h, w, 3, cin, cout, padding) + _conv(h, w, 3, cout, cout, padding)
  return f + (_conv(h, w, 1, cin, cout, padding) if cin != cout else 0.0)


def encoder_flops(cfg: VAEConfig, image_size: int, count_padding: bool = False) -> float:
  """Forward FLOPs of the encoder (+ quant_conv) on one image_size x image_size image; multiply-adds on the
  zero padding excluded unless `count_padding`."""
  ch, pad = cfg.block_out_channels, count_padding
  s = image_size
  total = _conv(s, s, 3, cfg.in_channels, ch[0], pad)
  cin = ch[0]
  for i, cout in enumerate(ch):
    for _ in range(cfg.layers_per_block):
      total += _resnet(s, s, cin, cout, pad)
      cin = cout
    if i < len(ch) - 1:
      total += _downsample(s, s, cout, pad)
      s //= 2
  c, n = ch[-1], s * s
  total += 2 * _resnet(s, s, c, c, pad)
  if cfg.mid_block_add_attention:
    total += 4 * 2.0 * n * c * c + attention_matmul_flops(cfg, image_size)   # q, k, v, out projections
  total += _conv(s, s, 3, c, 2 * cfg.latent_channels, pad)
  if cfg.use_quant_conv:
    total += _conv(s, s, 1, 2 * cfg.latent_channels, 2 * cfg.latent_channels, pad)
  return total


def attention_matmul_flops(cfg: VAEConfig, image_size: int) -> float:
  """The mid-block attention's scores and weighted values: 2 x 2 n^2 c over its n = (S/f)^2 positions."""
  n = (image_size // cfg.downsample_factor) ** 2
  return 2 * 2.0 * n * n * cfg.block_out_channels[-1] if cfg.mid_block_add_attention else 0.0


def lower_encoder(cfg: VAEConfig, devices: Sequence, image_size: int, batch_per_device: int):
  """`encode_latents` of the encoder half, lowered for `devices` from shapes only: images float32
  [batch_per_device * len(devices), S, S, 3] split over the devices, the VAE replicated."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from lmfusion_jax.models.vae import encode_latents
  from lmfusion_jax.training.online_encoding import graphdef_and_abstract
  mesh = Mesh(np.asarray(devices), ("data",))
  graphdef, state = graphdef_and_abstract(cfg)       # the encoder half, as the train step's online encoding
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  images = jax.ShapeDtypeStruct((batch_per_device * len(devices), image_size, image_size, cfg.in_channels),
                                jnp.float32, sharding=NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda st, x: encode_latents(nnx.merge(graphdef, st), x))
  with jax.set_mesh(mesh):
    return fn.lower(state, images), mesh


def encoder_cost(cfg: VAEConfig, devices: Sequence, image_size: int, batch_per_device: int) -> dict:
  """Per-device compiler figures of encoding batch_per_device images on each of `devices`."""
  import jax
  from lmfusion_jax.planning.cost import _cost
  from lmfusion_jax.planning.sampling import memory
  lowered, mesh = lower_encoder(cfg, devices, image_size, batch_per_device)
  with jax.set_mesh(mesh):
    compiled = lowered.compile()
  c = _cost(compiled)
  seconds = c["optimal_seconds"]
  return {"flops_per_image": c["flops"] / batch_per_device, "analytic_flops_per_image": encoder_flops(cfg, image_size),
          "seconds": seconds, "images_per_s_per_device": batch_per_device / seconds if seconds else None,
          "hbm_need_bytes": memory(compiled)["need"], "batch_per_device": batch_per_device}
