"""Text-to-image sampling with LMFusion: prefix `BOS caption BOI`, then the image is denoised in place.

The prefix never attends to the image (causal mask), so its keys/values are the same at every denoising
step: they are computed ONCE into a KV cache, and each step runs only the image tokens, which attend to the
cached prefix and bidirectionally to themselves (`use_cache=False` recomputes the prefix every step instead:
the reference for tests and the benchmark).

Classifier-free guidance (scale w != 1) runs the conditional and the unconditional rows in ONE batch: rows
[0, N) have prefix `BOS caption BOI`, rows [N, 2N) the dropped caption of training, `BOS BOI`. Prefixes of
different lengths share one left-padded cache; padding slots have segment id 0 and are never attended, and
every row places its image at its own prefix length, so each row computes exactly what it would alone.
eps = eps_uncond + w (eps_cond - eps_uncond) (`diffusion.cfg_combine`; w = 1 is plain conditional sampling
and runs N rows only).

  generate_images(model, prompts, diffusion_cfg, ...) -> latents float32 [N, H, W, C]
  sample_from_cache(model, cache, image_positions, ...)   the denoising loop over a given prefix cache
  decode_to_images(latents, vae=None) -> uint8 [N, H', W', C']   (identity for pixel datasets)
  write_png / contact_sheet / write_samples                      PNG output (atomic writes)
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax import diffusion
from lmfusion_jax.inference.text import left_pad
from lmfusion_jax.models import decoder
from lmfusion_jax.models.attention import TokenInfo

SAMPLERS = ("ddpm", "ddim")


def latent_shape(fcfg) -> tuple:
  """(H, W, C) of one latent."""
  return (fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels)


def prefixes(prompts: Sequence[Sequence[int]], bos_id: int, boi_id: int) -> list:
  """Caption token ids (no specials) -> `BOS caption BOI` id lists."""
  return [[bos_id] + [int(t) for t in p] + [boi_id] for p in prompts]


def prefix_arrays(prefix_ids: Sequence[Sequence[int]], pad_id: int = 0):
  """Left-padded prefixes -> (tokens, segment_ids, positions [R, P], image_positions [R]) as jnp int32.

  A row's image starts right after its own prefix, at position len(prefix)."""
  tokens, segs, pos = left_pad(prefix_ids, pad_id)
  image_pos = np.asarray([len(p) for p in prefix_ids], np.int32)
  return tuple(jnp.asarray(a) for a in (tokens, segs, pos, image_pos))


def _text_info(positions, segment_ids) -> TokenInfo:
  return TokenInfo(positions, segment_ids, jnp.full(positions.shape, -1, jnp.int32))


def _no_images(rows: int, shape: tuple):
  """Empty image inputs (I = 0) for a text-only forward of the fusion model."""
  z = jnp.zeros((rows, 0), jnp.int32)
  return jnp.zeros((rows, 0) + shape, jnp.float32), z, z, z


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill_prefix(graphdef, state, tokens, segment_ids, positions, cache_len: int):
  """K/V of the prefix tokens [R, P] in a fresh cache of `cache_len` >= P slots (text weights only)."""
  model = nnx.merge(graphdef, state)
  rows = tokens.shape[0]
  lat, t, ipos, iseg = _no_images(rows, latent_shape(model.fcfg))
  _, _, (k, v) = model(tokens, positions, segment_ids, lat, t, ipos, iseg)
  cache = decoder.empty_cache(model.lcfg, rows, cache_len)
  return decoder.write_cache(cache, k, v, _text_info(positions, segment_ids), 0)


def _image_inputs(x, t, image_positions):
  """One image per row: x [R, H, W, C], t [R] -> model image inputs with I = 1."""
  rows = x.shape[0]
  return x[:, None], t[:, None], image_positions[:, None], jnp.ones((rows, 1), jnp.int32)


def _cached_eps(model, cache: decoder.KVCache, image_positions):
  """eps_fn(x [R, ...], t [R]) running only the image tokens against the cached prefix."""
  def eps_fn(x, t):
    rows = x.shape[0]
    no_text = jnp.zeros((rows, 0), jnp.int32)
    _, eps, _ = model(no_text, no_text, no_text, *_image_inputs(x, t, image_positions), cache=cache)
    return eps[:, 0]
  return eps_fn


def _recompute_eps(model, tokens, segment_ids, positions, image_positions):
  """eps_fn(x, t) running the whole prefix and the image every call (no cache)."""
  def eps_fn(x, t):
    _, eps, _ = model(tokens, positions, segment_ids, *_image_inputs(x, t, image_positions))
    return eps[:, 0]
  return eps_fn


def _run_sampler(eps_batch_fn, dcfg, rng, n: int, shape: tuple, cfg_scale, eta, guided: bool,
                 num_steps: int, sampler: str, clip_x0):
  eps_fn = diffusion.guided_eps_fn(eps_batch_fn, cfg_scale) if guided else eps_batch_fn
  schedule = diffusion.make_schedule(dcfg)
  if sampler == "ddpm":
    return diffusion.ddpm_sample(eps_fn, schedule, rng, (n,) + shape, num_steps, clip_x0=clip_x0)
  return diffusion.ddim_sample(eps_fn, schedule, rng, (n,) + shape, num_steps, eta, clip_x0=clip_x0)


_STATIC = ("graphdef", "dcfg", "num_steps", "sampler", "guided", "clip_x0")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_cached(graphdef, state, cache, image_positions, rng, cfg_scale, eta, *, dcfg, num_steps, sampler,
                   guided, clip_x0):
  model = nnx.merge(graphdef, state)
  rows = image_positions.shape[0]
  n = rows // 2 if guided else rows
  eps_fn = _cached_eps(model, cache, image_positions)
  return _run_sampler(eps_fn, dcfg, rng, n, latent_shape(model.fcfg), cfg_scale, eta, guided, num_steps,
                      sampler, clip_x0)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_recompute(graphdef, state, tokens, segment_ids, positions, image_positions, rng, cfg_scale, eta, *,
                      dcfg, num_steps, sampler, guided, clip_x0):
  model = nnx.merge(graphdef, state)
  rows = image_positions.shape[0]
  n = rows // 2 if guided else rows
  eps_fn = _recompute_eps(model, tokens, segment_ids, positions, image_positions)
  return _run_sampler(eps_fn, dcfg, rng, n, latent_shape(model.fcfg), cfg_scale, eta, guided, num_steps,
                      sampler, clip_x0)


def _check_sampler(sampler: str, num_steps: int, dcfg, eta: float) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
  if not 1 <= num_steps <= dcfg.num_timesteps:
    raise ValueError(f"num_steps={num_steps}: must be in [1, num_timesteps={dcfg.num_timesteps}]")
  if sampler == "ddpm" and eta != 0.0:
    raise ValueError("eta applies to the ddim sampler only")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta={eta}: must be in [0, 1]")


def guided(cfg_scale: float) -> bool:
  """Whether a guidance scale needs the unconditional rows (w = 1 is the conditional model alone)."""
  return float(cfg_scale) != 1.0


def sample_from_cache(model, cache: decoder.KVCache, image_positions, diffusion_cfg, *, num_steps: int = 250,
                      sampler: str = "ddpm", cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0,
                      clip_x0: Optional[float] = None) -> jax.Array:
  """Denoises one image per cache row after the cached prefix; returns latents float32 [N, H, W, C].

  cache: a KVCache [R rows] holding each row's prefix (empty slots: segment 0); image_positions int [R]: the
  position of each row's first image token. With guidance (cfg_scale != 1) rows [0, N) are conditional and
  [N, 2N) unconditional (R = 2N); otherwise R = N.
  """
  _check_sampler(sampler, num_steps, diffusion_cfg, eta)
  image_positions = jnp.asarray(image_positions, jnp.int32)
  g = guided(cfg_scale)
  if g and image_positions.shape[0] % 2:
    raise ValueError(f"guided sampling needs 2N cache rows (conditional then unconditional), got "
                     f"{image_positions.shape[0]}")
  graphdef, state = nnx.split(model)
  return _sample_cached(graphdef, state, cache, image_positions, jax.random.key(seed),
                        jnp.float32(cfg_scale), jnp.float32(eta), dcfg=diffusion_cfg, num_steps=num_steps,
                        sampler=sampler, guided=g, clip_x0=clip_x0)


def generate_images(model, prompts: Sequence[Sequence[int]], diffusion_cfg, *, num_steps: int = 250,
                    sampler: str = "ddpm", cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0,
                    clip_x0: Optional[float] = None, use_cache: bool = True,
                    pad_id: int = 0) -> jax.Array:
  """One image per prompt (caption token ids, no special tokens); returns latents float32 [N, H, W, C].

  sampler "ddpm" (ancestral, respaced to `num_steps` of the training schedule; the paper uses 250) or "ddim"
  (deterministic for eta = 0). `seed` fixes the initial noise and every step's noise. `clip_x0` clips the
  predicted clean latent (1.0 suits pixel-space data in [-1, 1]; None for VAE latents).
  """
  if not prompts:
    raise ValueError("generate_images: no prompts")
  _check_sampler(sampler, num_steps, diffusion_cfg, eta)
  lcfg, fcfg = model.lcfg, model.fcfg
  if fcfg.boi_id < 0 or lcfg.bos_id < 0:
    raise ValueError(f"generate_images: the model config has no BOS/BOI ids (bos_id={lcfg.bos_id}, "
                     f"boi_id={fcfg.boi_id})")
  rows = prefixes(prompts, lcfg.bos_id, fcfg.boi_id)
  g = guided(cfg_scale)
  if g:
    rows = rows + prefixes([[]] * len(prompts), lcfg.bos_id, fcfg.boi_id)
  longest = max(len(r) for r in rows) + fcfg.tokens_per_image
  if longest > lcfg.max_seq_len:
    raise ValueError(f"generate_images: prompt + image need {longest} positions > model.max_seq_len="
                     f"{lcfg.max_seq_len}")
  tokens, segs, pos, image_pos = prefix_arrays(rows, pad_id)
  graphdef, state = nnx.split(model)
  rng = jax.random.key(seed)
  static = dict(dcfg=diffusion_cfg, num_steps=num_steps, sampler=sampler, guided=g, clip_x0=clip_x0)
  if not use_cache:
    return _sample_recompute(graphdef, state, tokens, segs, pos, image_pos, rng, jnp.float32(cfg_scale),
                             jnp.float32(eta), **static)
  cache = prefill_prefix(graphdef, state, tokens, segs, pos, cache_len=tokens.shape[1])
  return _sample_cached(graphdef, state, cache, image_pos, rng, jnp.float32(cfg_scale), jnp.float32(eta),
                        **static)


# ---------------------------------------------------------------------------------------------- images


def to_float_images(latents, vae=None) -> np.ndarray:
  """Latents [N, h, w, c] -> float images in [-1, 1] (clipped) [N, H, W, C]: the VAE decoder, or the
  identity for pixel-space datasets (digits: the latent IS the image)."""
  x = jnp.asarray(latents, jnp.float32)
  if vae is not None:
    from lmfusion_jax.models.vae import jit_decode_latents
    x = jit_decode_latents(vae)(x)
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"latents must be [N, H, W, C], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("decoded images contain NaN or Inf")
  return np.clip(x, -1.0, 1.0)


def float_to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> 0..255 (rounded)."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def decode_to_images(latents, vae=None) -> np.ndarray:
  """Latents [N, h, w, c] -> uint8 images [N, H, W, C] (VAE decode, or identity mapping [-1, 1] -> 0..255)."""
  return float_to_uint8(to_float_images(latents, vae))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of uint8 [N, H, W, C] by an integer factor (tiny digits become visible)."""
  if factor < 1:
    raise ValueError(f"upscale factor {factor} must be >= 1")
  return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def contact_sheet(images: np.ndarray, columns: Optional[int] = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 grid image [rows * (H + pad) + pad, cols * (W + pad) + pad, C]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
    raise ValueError(f"contact_sheet: expected uint8 [N, H, W, C] with N >= 1, got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    sheet[y:y + h, x:x + w] = img
  return sheet


def write_png(path, image: np.ndarray) -> str:
  """Writes uint8 [H, W, 1|3|4] (or [H, W]) as PNG, atomically (temporary file in the folder, then rename)."""
  from PIL import Image
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"write_png {path}: expected uint8 pixels, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"write_png {path}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_samples(images: np.ndarray, out_dir, prefix: str = "sample", scale: int = 1,
                  columns: Optional[int] = None) -> dict:
  """Writes each uint8 image as OUT/prefix_00000.png and a contact sheet OUT/contact_sheet.png (both
  upscaled by `scale`). Returns {"images": [paths], "contact_sheet": path}."""
  images = upscale(np.asarray(images), scale)
  paths = [write_png(os.path.join(os.fspath(out_dir), f"{prefix}_{i:05d}.png"), img)
           for i, img in enumerate(images)]
  sheet = write_png(os.path.join(os.fspath(out_dir), "contact_sheet.png"), contact_sheet(images, columns))
  return {"images": paths, "contact_sheet": sheet}
