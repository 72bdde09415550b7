"""Small parameterized layers shared by the image in/out modules (image_io.py) and the VAE (vae.py): Dense, Conv
(NHWC, HWIO kernels) and GroupNorm (statistics in fp32). Parameters carry logical axis names.

Initializers (`init`): "fan_in" (normal / sqrt(fan_in): the U-Net), "normal" (std 0.02: the VAE, whose
weights come from a converted checkpoint anyway), "zeros" (output layers that start as the identity).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models.params import normal, param, zeros


def _init(rngs, shape, fan_in: int, dtype, init: str) -> jax.Array:
  if init == "zeros":
    return zeros(shape, dtype)
  if init == "normal":
    return normal(rngs, shape, dtype)
  if init == "fan_in":
    return (jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
  raise ValueError(f"unknown initializer {init!r}")


class Dense(nnx.Module):
  """x [..., d_in] @ kernel [d_in, d_out] + bias; `names` are the kernel's logical axis names."""

  def __init__(self, d_in: int, d_out: int, names: Sequence[str], dtype, *, rngs: nnx.Rngs, init: str = "fan_in"):
    self.kernel = param(_init(rngs, (d_in, d_out), d_in, dtype, init), names)
    self.bias = param(zeros((d_out,), dtype), (names[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype)) + self.bias[...].astype(x.dtype)


class Conv(nnx.Module):
  """k x k convolution, NHWC, kernel HWIO [k, k, in, out]; stride and padding may be overridden per call."""

  def __init__(self, c_in: int, c_out: int, dtype, *, rngs: nnx.Rngs, kernel: int = 3, stride: int = 1,
               init: str = "fan_in"):
    shape = (kernel, kernel, c_in, c_out)
    self.kernel = param(_init(rngs, shape, kernel * kernel * c_in, dtype, init),
                        ("conv_h", "conv_w", "conv_in", "conv_out"))
    self.bias = param(zeros((c_out,), dtype), ("conv_out",))
    self.stride = stride

  def __call__(self, x: jax.Array, stride: Optional[int] = None, padding="SAME") -> jax.Array:
    s = self.stride if stride is None else stride
    y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (s, s), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on NHWC: statistics over H, W and the channels of a group, in fp32. The group count
  is gcd(groups, channels)."""

  def __init__(self, channels: int, groups: int, dtype, eps: float = 1e-6):
    self.groups = math.gcd(groups, channels)
    self.eps = eps
    self.scale = param(jnp.ones((channels,), dtype), ("norm",))
    self.bias = param(zeros((channels,), dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
    xf = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    y = xf * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)
