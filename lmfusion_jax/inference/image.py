"""Text-to-image sampling with LMFusion: prefix `BOS caption BOI`, then the image is denoised in place.

The prefix never attends to the image (causal mask), so its keys/values are the same at every denoising
step: they are computed ONCE into a KV cache (`Sampler.prefill_arrays`, text weights), and each step runs only
the image tokens, which attend to the cached prefix and bidirectionally to themselves (`Sampler.denoise`).
`use_cache=False` recomputes the prefix every step instead: the reference for tests and the benchmark.

Classifier-free guidance (scale w != 1) runs the conditional and the unconditional rows in ONE batch: rows
[0, N) have prefix `BOS caption BOI`, rows [N, 2N) the dropped caption of training, `BOS BOI`. Prefixes of
different lengths share one left-padded cache; padding slots have segment id 0 and are never attended, and
every row places its image at its own prefix length, so each row computes exactly what it would alone.
eps = eps_uncond + w (eps_cond - eps_uncond) (`diffusion.cfg_combine`; w = 1 is plain conditional sampling
and runs N rows only).

  generate_images(model, prompts, diffusion_cfg, ...) -> latents float32 [N, H, W, C]
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.inference.sampler import (DIFFUSION_STATIC, Sampler, check_sampler, guided, latent_shape,
                                            left_pad, run_diffusion, sampling_key)
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.errors import UserError


def prefixes(prompts: Sequence[Sequence[int]], bos_id: int, boi_id: int) -> list:
  """Caption token ids (no specials) -> `BOS caption BOI` id lists."""
  return [[bos_id] + [int(t) for t in p] + [boi_id] for p in prompts]


def prefix_arrays(prefix_ids: Sequence[Sequence[int]], pad_id: int = 0):
  """Left-padded prefixes -> (tokens, segment_ids, positions [R, P], image_positions [R]) as jnp int32.

  A row's image starts right after its own prefix, at position len(prefix)."""
  tokens, segs, pos = left_pad(prefix_ids, pad_id)
  image_pos = np.asarray([len(p) for p in prefix_ids], np.int32)
  return tuple(jnp.asarray(a) for a in (tokens, segs, pos, image_pos))


@functools.partial(jax.jit, static_argnames=DIFFUSION_STATIC)
def _sample_recompute(graphdef, state, tokens, segment_ids, positions, image_positions, rng, cfg_scale, eta, *,
                      dcfg, num_steps, sampler, is_guided, clip_x0):
  """The reference: the whole prefix and the image run at every step (no cache)."""
  model = nnx.merge(graphdef, state)
  text = TextInputs(tokens, positions, segment_ids)

  def eps_fn(x, t):
    _, eps, _ = model(text, ImageInputs.one_per_row(x, t, image_positions))
    return eps[:, 0]

  rows = image_positions.shape[0]
  n = rows // 2 if is_guided else rows
  return run_diffusion(eps_fn, dcfg, rng, n, latent_shape(model.fcfg), cfg_scale, eta, is_guided, num_steps,
                       sampler, clip_x0)


def generate_images(model, prompts: Sequence[Sequence[int]], diffusion_cfg, *, num_steps: int = 250,
                    sampler: str = "ddpm", cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0,
                    clip_x0: Optional[float] = None, use_cache: bool = True,
                    pad_id: int = 0, progress=None, image_ids: Optional[Sequence[int]] = None) -> jax.Array:
  """One image per prompt (caption token ids, no special tokens); returns latents float32 [N, H, W, C].

  sampler "ddpm" (ancestral, respaced to `num_steps` of the training schedule; the paper uses 250) or "ddim"
  (deterministic for eta = 0). `seed` fixes the initial noise and every step's noise; with `image_ids` (one int
  per prompt) image n's noise comes from (seed, image_ids[n]) alone, independent of the batch it is in. `clip_x0` clips the
  predicted clean latent (1.0 suits pixel-space data in [-1, 1]; None for VAE latents). `progress` (a
  lmfusion_jax.progress.Progress) is advanced by the number of prompts once their images are done (all
  denoising steps run in one compiled loop).
  """
  if not prompts:
    raise UserError("generate_images: no prompts")
  check_sampler(sampler, num_steps, diffusion_cfg, eta)
  if not math.isfinite(cfg_scale):
    raise UserError(f"cfg_scale={cfg_scale}: the guidance scale must be a finite number")
  if clip_x0 is not None and not (math.isfinite(clip_x0) and clip_x0 > 0):
    raise UserError(f"clip_x0={clip_x0}: must be a finite number > 0 (or None for no clipping)")
  lcfg, fcfg = model.lcfg, model.fcfg
  if fcfg.boi_id < 0 or lcfg.bos_id < 0:
    raise UserError(f"generate_images: the model config has no BOS/BOI ids (bos_id={lcfg.bos_id}, "
                     f"boi_id={fcfg.boi_id})")
  rows = prefixes(prompts, lcfg.bos_id, fcfg.boi_id)
  g = guided(cfg_scale)
  if g:
    rows = rows + prefixes([[]] * len(prompts), lcfg.bos_id, fcfg.boi_id)
  longest = max(len(r) for r in rows) + fcfg.tokens_per_image
  if longest > lcfg.max_seq_len:
    raise UserError(f"generate_images: prompt + image need {longest} positions > model.max_seq_len="
                     f"{lcfg.max_seq_len}")
  tokens, segs, pos, image_pos = prefix_arrays(rows, pad_id)
  if progress is not None:
    out = generate_images(model, prompts, diffusion_cfg, num_steps=num_steps, sampler=sampler,
                          cfg_scale=cfg_scale, seed=seed, eta=eta, clip_x0=clip_x0, use_cache=use_cache,
                          pad_id=pad_id, image_ids=image_ids)
    out = jax.block_until_ready(out)
    progress.update(len(prompts))
    return out
  if not use_cache:
    return _sample_recompute(*nnx.split(model), tokens, segs, pos, image_pos, sampling_key(seed, image_ids),
                             jnp.float32(cfg_scale), jnp.float32(eta), dcfg=diffusion_cfg, num_steps=num_steps,
                             sampler=sampler, is_guided=g, clip_x0=clip_x0)
  s = Sampler(model)
  _, cache = s.prefill_arrays(tokens, segs, pos, cache_len=tokens.shape[1])
  return s.denoise(cache, image_pos, diffusion_cfg, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale,
                   seed=seed, eta=eta, clip_x0=clip_x0, image_ids=image_ids)
