"""Image understanding: greedy captions of clean image latents.

Captioning follows the image-first training layout `BOS BOI <clean image, t = 0> EOI caption EOS`: the prefix
runs once through the fusion model (image tokens through the image weights) into a KV cache
(`Sampler.prefill_image`), then the caption is decoded greedily with the text weights, attending to the cached
image K/V. A batch of images shares one prefix layout, so no padding is needed. `use_cache=False` recomputes
the whole sequence for every new token (the reference the tests compare against).

  caption_latents(model, latents [B, H, W, C], max_new_tokens) -> new token ids per image (ending at EOS)
  caption_images(model, tokenizer, latents, ...) -> caption strings (batched)
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.data.batch import padded_chunks
from lmfusion_jax.inference.sampler import Sampler, clean_images, image_prefix, latent_shape, trim_at_eos
from lmfusion_jax.models.inputs import TextInputs
from lmfusion_jax.progress import Progress
from lmfusion_jax.errors import UserError


def check_latents(latents, fcfg) -> jax.Array:
  x = jnp.asarray(latents, jnp.float32)
  want = latent_shape(fcfg)
  if x.ndim != 4 or tuple(x.shape[1:]) != want:
    raise UserError(f"latents have shape {tuple(x.shape)}, the model expects [N, {', '.join(map(str, want))}]")
  return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_logits(graphdef, state, latents, tokens, positions, segments):
  """Logits [B, T, V] of the whole sequence (prefix + generated text), recomputed from scratch."""
  model = nnx.merge(graphdef, state)
  image = clean_images(latents, jnp.full((latents.shape[0],), 2, jnp.int32))
  logits, _, _ = model(TextInputs(tokens, positions, segments), image)
  return logits


def _recompute_greedy(model, latents, max_new_tokens: int, eos: Sequence[int], pad_id: int) -> np.ndarray:
  """Greedy decoding by full recomputation: slot 3 + i holds new token i (segment 0 until generated)."""
  graphdef, state = nnx.split(model)
  rows, p = latents.shape[0], model.fcfg.tokens_per_image
  prefix = image_prefix(rows, model.lcfg, model.fcfg)
  tokens = np.concatenate([np.asarray(prefix.tokens), np.full((rows, max_new_tokens), pad_id, np.int32)], axis=1)
  positions = np.concatenate([np.asarray(prefix.positions),
                              np.tile(3 + p + np.arange(max_new_tokens, dtype=np.int32), (rows, 1))], axis=1)
  segments = np.zeros_like(tokens)
  segments[:, :3] = 1
  done = np.zeros(rows, bool)
  for i in range(max_new_tokens):
    logits = _full_forward_logits(graphdef, state, latents, jnp.asarray(tokens), jnp.asarray(positions),
                                  jnp.asarray(segments))
    tok = np.asarray(jnp.argmax(logits[:, 2 + i], axis=-1)).astype(np.int32)
    tok = np.where(done, pad_id, tok)
    tokens[:, 3 + i] = tok
    segments[:, 3 + i] = 1
    done |= np.isin(tok, list(eos))
    if done.all():
      break
  return tokens[:, 3:]


def caption_latents(model, latents, max_new_tokens: int = 32, *, use_cache: bool = True,
                    eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0) -> List[List[int]]:
  """Greedy caption token ids for each clean latent [B, H, W, C]; each list ends with EOS if one was produced.

  `eos_ids=None` stops at the model's EOS id. All rows run in one batch.
  """
  if max_new_tokens < 1:
    raise UserError(f"caption: max_new_tokens={max_new_tokens} must be >= 1")
  lcfg, fcfg = model.lcfg, model.fcfg
  latents = check_latents(latents, fcfg)
  eos = [lcfg.eos_id] if eos_ids is None else list(eos_ids)
  prefix_len = 3 + fcfg.tokens_per_image
  if prefix_len + max_new_tokens > lcfg.max_seq_len:
    raise UserError(f"caption: image prefix ({prefix_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"max_seq_len={lcfg.max_seq_len}")
  if not use_cache:
    return trim_at_eos(_recompute_greedy(model, latents, max_new_tokens, eos, pad_id), eos)
  sampler = Sampler(model)
  logits, cache = sampler.prefill_image(latents, cache_len=prefix_len + max_new_tokens)
  out = sampler.decode(logits, cache, [prefix_len] * latents.shape[0], prefix_len, max_new_tokens, eos_ids=eos,
                       pad_id=pad_id)
  return trim_at_eos(out, eos)


def caption_images(model, tokenizer, latents, *, max_new_tokens: int = 32, batch_size: int = 32,
                   progress_desc: Optional[str] = None) -> List[str]:
  """Caption strings for latents [N, H, W, C], in batches of `batch_size` (the last one padded with zeros, so
  one compilation serves all batches). Special tokens are dropped from the decoded text. `progress_desc`
  given: images done are reported per batch under that name (lmfusion_jax.progress)."""
  latents = np.asarray(check_latents(latents, model.fcfg))
  out = []
  with Progress(len(latents), progress_desc or "", "image", enabled=None if progress_desc else False) as p:
    for chunk, real in padded_chunks(list(latents), batch_size, np.zeros_like(latents[0])):
      ids = caption_latents(model, np.stack(chunk), max_new_tokens)[:real]
      out.extend(tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids)
      p.update(real)
  return out
