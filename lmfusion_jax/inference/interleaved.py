"""Interleaved text and image generation (one sequence): greedy text until the model emits BOI; then an image is
denoised after the cached context, its clean latent is appended at t = 0 together with EOI, and text
continues, until EOS or the token budget. Every step goes through inference.sampler.

  generate_interleaved(model, prompt_ids, diffusion_cfg, ...) -> [("text", ids) | ("image", latent), ...]
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from lmfusion_jax.inference.image import prefix_arrays
from lmfusion_jax.inference.sampler import Sampler, guided, stack_rows
from lmfusion_jax.errors import UserError


def generate_interleaved(model, prompt_ids: Sequence[int], diffusion_cfg, *, max_new_tokens: int = 64,
                         max_images: int = 1, num_steps: int = 250, sampler: str = "ddpm",
                         cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0,
                         clip_x0: Optional[float] = None) -> list:
  """Greedy text from `prompt_ids` (including BOS); every BOI the model emits (up to `max_images`) is
  followed by a sampled image, EOI, and more text. Stops at EOS or after `max_new_tokens` text tokens.

  Returns segments in order: ("text", [new token ids]) and ("image", latent float32 [H, W, C]); a text
  segment that triggered an image ends with BOI, the EOI after an image is implicit. With guidance the
  unconditional row is `BOS BOI` (the dropped caption of training).
  """
  lcfg, fcfg = model.lcfg, model.fcfg
  prompt = [int(t) for t in prompt_ids]
  if not prompt:
    raise UserError("generate_interleaved: empty prompt (it should at least hold BOS)")
  p = fcfg.tokens_per_image
  cache_len = len(prompt) + max_new_tokens + max_images * (p + 1)
  if cache_len > lcfg.max_seq_len:
    raise UserError(f"generate_interleaved: prompt + {max_new_tokens} tokens + {max_images} images need "
                     f"{cache_len} positions > max_seq_len={lcfg.max_seq_len}")
  s = Sampler(model)
  logits, cache = s.prefill([prompt], cache_len=cache_len)
  position = index = len(prompt)
  segments, text, images = [], [], 0
  for _ in range(max_new_tokens):
    tok = int(jnp.argmax(logits[0]))
    text.append(tok)
    if tok == lcfg.eos_id:
      break
    logits, cache = s.decode_step(cache, [tok], [position], index)
    position, index = position + 1, index + 1
    if tok == fcfg.boi_id and images < max_images:
      segments.append(("text", text))
      text = []
      rows, image_pos = cache, [position]
      if guided(cfg_scale):
        tokens, segs, pos, _ = prefix_arrays([[lcfg.bos_id, fcfg.boi_id]])
        _, uncond = s.prefill_arrays(tokens, segs, pos, cache_len=cache_len)
        rows, image_pos = stack_rows(cache, uncond), [position, 2]
      latent = s.denoise(rows, image_pos, diffusion_cfg, num_steps=num_steps, sampler=sampler,
                         cfg_scale=cfg_scale, seed=seed + images, eta=eta, clip_x0=clip_x0)
      logits, cache = s.append_image(cache, latent[:1], position, index)
      segments.append(("image", np.asarray(latent[0])))
      position, index, images = position + p + 1, index + p + 1, images + 1
  if text:
    segments.append(("text", text))
  return segments
