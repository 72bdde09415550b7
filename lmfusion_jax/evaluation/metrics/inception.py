"""Inception-v3 in its FID variant (pytorch-fid's `InceptionV3([3])` with `use_fid_inception=True`): the
network behind the standard FID numbers, up to the pool3 features [N, 2048].

Same blocks as pytorch-fid (which patches torchvision's Inception3 to match the TensorFlow graph of TTUR):
  Conv2d_1a..4a (conv + BatchNorm(eps 1e-3) + ReLU units, two 3x3 / stride 2 max pools),
  Mixed_5b/5c/5d  FIDInceptionA: its 3x3 / stride 1 avg pool ignores the zero padding (count_include_pad=False)
  Mixed_6a        InceptionB (3x3 / stride 2 max pool)
  Mixed_6b..6e    FIDInceptionC (avg pool without the padding, as in A)
  Mixed_7a        InceptionD (3x3 / stride 2 max pool)
  Mixed_7b        FIDInceptionE_1 (avg pool without the padding)
  Mixed_7c        FIDInceptionE_2 (a 3x3 / stride 1 MAX pool in the pool branch)
  global average pool -> [N, 2048]
Input: float images [N, H, W, 3] in [0, 1]; resized to 299 x 299 bilinearly exactly like torch's
`F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing, also when shrinking), then scaled to
[-1, 1] (2x - 1): pytorch-fid's resize_input=True, normalize_input=True. NHWC activations, HWIO kernels,
convolutions at HIGHEST precision (the statistics must not depend on the backend's default precision).

Weights come only from a conversion (lmfusion_jax.convert.inception_weights); parameter names are torchvision's
(`Mixed_5b.branch1x1` ...), so each maps onto one state_dict key.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.errors import UserError
from lmfusion_jax.inference.image_files import to_8bit

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBN(nnx.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

  def __init__(self, c_in: int, c_out: int, kernel=1, stride: int = 1, padding=0):
    kh, kw = _pair(kernel)
    self.kernel = nnx.Param(jnp.zeros((kh, kw, c_in, c_out), jnp.float32))   # HWIO  <- conv.weight (OIHW)
    self.scale = nnx.Param(jnp.ones((c_out,), jnp.float32))                   # <- bn.weight
    self.bias = nnx.Param(jnp.zeros((c_out,), jnp.float32))                   # <- bn.bias
    self.mean = nnx.BatchStat(jnp.zeros((c_out,), jnp.float32))               # <- bn.running_mean
    self.var = nnx.BatchStat(jnp.ones((c_out,), jnp.float32))                 # <- bn.running_var
    self.stride = stride
    self.padding = _pair(padding)

  def __call__(self, x: jax.Array) -> jax.Array:   # [N, H, W, c_in] -> [N, H', W', c_out]
    (ph, pw), s = self.padding, self.stride
    y = jax.lax.conv_general_dilated(x, self.kernel[...], (s, s), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return jax.nn.relu(y * inv + (self.bias[...] - self.mean[...] * inv))


def _window(x, init, op, size: int, stride: int, pad: int):
  return jax.lax.reduce_window(x, init, op, (1, size, size, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def max_pool(x, size: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
  """torch max_pool2d (floor mode; padding never wins the max)."""
  return _window(x, -jnp.inf, jax.lax.max, size, stride, pad)


def avg_pool_3x3_exclude_pad(x) -> jax.Array:
  """torch avg_pool2d(3, stride 1, padding 1, count_include_pad=False): each mean over the in-image cells."""
  total = _window(x, 0.0, jax.lax.add, 3, 1, 1)                          # [N, H, W, C]
  count = _window(jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0, jax.lax.add, 3, 1, 1)   # [1, H, W, 1]
  return total / count


def _cat(*xs) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
  """FIDInceptionA: -> 224 + pool_features channels."""

  def __init__(self, c_in: int, pool_features: int):
    self.branch1x1 = ConvBN(c_in, 64)
    self.branch5x5_1 = ConvBN(c_in, 48)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = ConvBN(c_in, 64)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
    self.branch_pool = ConvBN(c_in, pool_features)

  def __call__(self, x):
    return _cat(self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(avg_pool_3x3_exclude_pad(x)))


class InceptionB(nnx.Module):
  """Mixed_6a: grid 35 -> 17, -> 480 + c_in channels."""

  def __init__(self, c_in: int):
    self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
    self.branch3x3dbl_1 = ConvBN(c_in, 64)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

  def __call__(self, x):
    return _cat(self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                max_pool(x))


class InceptionC(nnx.Module):
  """FIDInceptionC: factorized 7x7 convolutions, -> 768 channels."""

  def __init__(self, c_in: int, c7: int):
    self.branch1x1 = ConvBN(c_in, 192)
    self.branch7x7_1 = ConvBN(c_in, c7)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = ConvBN(c_in, c7)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = ConvBN(c_in, 192)

  def __call__(self, x):
    d = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      d = conv(d)
    return _cat(self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                d,
                self.branch_pool(avg_pool_3x3_exclude_pad(x)))


class InceptionD(nnx.Module):
  """Mixed_7a: grid 17 -> 8, -> 512 + c_in channels."""

  def __init__(self, c_in: int):
    self.branch3x3_1 = ConvBN(c_in, 192)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
    self.branch7x7x3_1 = ConvBN(c_in, 192)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

  def __call__(self, x):
    b = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
    return _cat(self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b), max_pool(x))


class InceptionE(nnx.Module):
  """FIDInceptionE_1 (pool="avg", padding excluded) / FIDInceptionE_2 (pool="max"): -> 2048 channels."""

  def __init__(self, c_in: int, pool: str):
    if pool not in ("avg", "max"):
      raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = ConvBN(c_in, 320)
    self.branch3x3_1 = ConvBN(c_in, 384)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = ConvBN(c_in, 448)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = ConvBN(c_in, 192)

  def __call__(self, x):
    a = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
    return _cat(self.branch1x1(x),
                self.branch3x3_2a(a), self.branch3x3_2b(a),
                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                self.branch_pool(pooled))


@functools.lru_cache(maxsize=16)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] weights of torch's bilinear interpolation, align_corners=False, no antialiasing (one axis):
  src = max((dst + 0.5) * in / out - 0.5, 0), between floor(src) and the next cell (clamped at the edge).
  As torch's CPU kernel: scale in float32, src rounded to float32 once (it compiles to a fused multiply-add;
  rounding twice moves src by an ulp, up to 3e-5 at src ~ 300, and pixels by up to 1.5e-5)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  frac = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(w, (rows, i0), np.float32(1) - frac)
  np.add.at(w, (rows, i1), frac)
  return w


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[N, H, W, C] -> [N, size, size, C] exactly as torch F.interpolate(bilinear, align_corners=False)."""
  n, h, w, c = x.shape
  if (h, w) == (size, size):
    return x   # torch's resize to the same size is the identity
  y = jnp.einsum("oh,nhwc->nowc", bilinear_matrix(size, h), x, precision=HIGHEST)
  return jnp.einsum("pw,nowc->nopc", bilinear_matrix(size, w), y, precision=HIGHEST)


class FIDInceptionV3(nnx.Module):
  """Images [N, H, W, 3] in [0, 1] -> pool3 features [N, 2048] (float32)."""

  def __init__(self):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = ConvBN(64, 80)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, "avg")
    self.Mixed_7c = InceptionE(2048, "max")

  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize_bilinear(jnp.asarray(images, jnp.float32))   # [N, 299, 299, 3]
    x = 2.0 * x - 1.0                                          # [0, 1] -> [-1, 1]
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # [N, 147, 147, 64]
    x = max_pool(x)                                            # [N, 73, 73, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))              # [N, 71, 71, 192]
    x = max_pool(x)                                            # [N, 35, 35, 192]
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,   # [N, 35, 35, 288]
                  self.Mixed_6a,                                 # [N, 17, 17, 768]
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a,                                 # [N, 8, 8, 1280]
                  self.Mixed_7b, self.Mixed_7c):                 # [N, 8, 8, 2048]
      x = block(x)
    return jnp.mean(x, axis=(1, 2))                            # [N, 2048]


@functools.lru_cache(maxsize=4)
def _jitted(graphdef):
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


_resize = jax.jit(resize_bilinear)


def _batch_features(model, chunk, bs: int) -> np.ndarray:
  """One batch (an array [m, H, W, 3] or m arrays [H_i, W_i, 3], m <= bs) -> float32 [m, 2048]; padded to bs
  so the network compiles once per batch size."""
  batches = [chunk] if isinstance(chunk, (np.ndarray, jax.Array)) else [np.asarray(im)[None] for im in chunk]
  for b in batches:
    if b.ndim != 4 or b.shape[-1] != 3:
      raise ValueError(f"inception_features: expected RGB images [N, H, W, 3], got {tuple(b.shape)}")
  x = jnp.concatenate([_resize(jnp.asarray(b, jnp.float32)) for b in batches])   # [m, 299, 299, 3]
  m = x.shape[0]
  if m < bs:
    x = jnp.concatenate([x, jnp.zeros((bs - m,) + x.shape[1:], x.dtype)])
  graphdef, state = nnx.split(model)
  return np.asarray(_jitted(graphdef)(state, x))[:m]


def inception_features(model: FIDInceptionV3, images: Union[np.ndarray, Sequence[np.ndarray]],
                       batch_size: int = 50) -> np.ndarray:
  """pool3 features, float64 [N, 2048], of float images in [0, 1]: one array [N, H, W, 3] or a sequence of
  [H_i, W_i, 3] arrays of any sizes (each resized to 299 x 299 first), in batches of `batch_size`."""
  n = len(images)
  bs = max(1, min(int(batch_size), n))
  out = [_batch_features(model, images[s:s + bs], bs) for s in range(0, n, bs)]
  return np.concatenate(out).astype(np.float64) if out else np.zeros((0, FEATURE_DIM), np.float64)


# pytorch-fid's extensions (matched case-insensitively here, and in sub-folders too)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_images(folder) -> list[str]:
  """Every image file under `folder` (recursively, by extension), sorted by path."""
  if not os.path.isdir(folder):
    raise UserError(f"--images {folder}: no such folder")
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                 if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in f)
  if not paths:
    raise UserError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
  return paths


def read_image(path: str) -> np.ndarray:
  """An image file -> float32 [H, W, 3] in [0, 1] (RGB; 16-bit and transparency via inference.image_files'
  `to_8bit`: transparent pixels on white, where pytorch-fid's `convert("RGB")` drops the alpha)."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      img.load()
      rgb = to_8bit(img, "RGB")
  except Exception as e:   # PIL raises several types for unreadable files
    raise UserError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
  return np.asarray(rgb, np.float32) / 255.0


def folder_features(model: FIDInceptionV3, folder, batch_size: int = 50, on_bad_image: str = "error",
                    on_batch=None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
  """pool3 features of every image under `folder`, read batch by batch (never all in memory):
  (features float64 [N, 2048], the N paths read, [(path, reason)] of unreadable files). on_bad_image="error"
  raises a UserError naming the first unreadable file; "skip" leaves it out and lists it."""
  if on_bad_image not in ("error", "skip"):
    raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
  paths, used, bad, feats, chunk, done = list_images(folder), [], [], [], [], 0
  bs = max(1, min(int(batch_size), len(paths)))
  for i, path in enumerate(paths):
    try:
      chunk.append(read_image(path))
      used.append(path)
    except UserError as e:
      if on_bad_image == "error":
        raise UserError(f"{e} (pass --on-bad-image skip to leave unreadable files out)") from e
      bad.append((path, str(e)))
    if len(chunk) == bs or (i == len(paths) - 1 and chunk):
      feats.append(_batch_features(model, chunk, bs))
      if on_batch is not None:
        on_batch(i + 1 - done)   # files handled since the last call, unreadable ones included
      chunk, done = [], i + 1
  out = np.concatenate(feats).astype(np.float64) if feats else np.zeros((0, FEATURE_DIM), np.float64)
  return out, used, bad
