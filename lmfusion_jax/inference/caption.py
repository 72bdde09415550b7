"""Image understanding with LMFusion: captioning and interleaved text/image generation.

Captioning follows the image-first training layout `BOS BOI <clean image, t = 0> EOI caption EOS`:
the prefix `BOS BOI image EOI` runs once through the fusion model (image tokens through the image weights)
into a KV cache, then the caption is decoded greedily token by token with the text weights only
(`generate`'s decode loop over the text tower, attending to the cached image K/V). A batch of images
shares one prefix layout, so no padding is needed. `use_cache=False` recomputes the whole sequence for
every new token (the reference the tests compare against).

Interleaved generation (`generate_interleaved`, one sequence): greedy text until the model emits BOI;
then an image is sampled after the cached context (`generate_image.sample_from_cache`), its clean latent
is appended at t = 0 together with EOI, and text continues, until EOS or the token budget.

  caption_latents(model, latents [B, H, W, C], max_new_tokens) -> new token ids per image (ending at EOS)
  caption_images(model, tokenizer, latents, ...) -> caption strings (batched)
  generate_interleaved(model, prompt_ids, diffusion_cfg, ...) -> [("text", ids) | ("image", latent), ...]
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.inference import text as generate
from lmfusion_jax.inference import image as generate_image
from lmfusion_jax.models import decoder
from lmfusion_jax.models.attention import TokenInfo
from lmfusion_jax.models.fusion import image_token_info


def _check_latents(latents, fcfg) -> jax.Array:
  x = jnp.asarray(latents, jnp.float32)
  want = generate_image.latent_shape(fcfg)
  if x.ndim != 4 or tuple(x.shape[1:]) != want:
    raise ValueError(f"latents have shape {tuple(x.shape)}, the model expects [N, {', '.join(map(str, want))}]")
  return x


def _prefix_inputs(rows: int, lcfg, fcfg):
  """Text part of `BOS BOI <image> EOI`: tokens/positions/segments [R, 3]; image at position 2."""
  p = fcfg.tokens_per_image
  tokens = jnp.tile(jnp.asarray([[lcfg.bos_id, fcfg.boi_id, fcfg.eoi_id]], jnp.int32), (rows, 1))
  positions = jnp.tile(jnp.asarray([[0, 1, 2 + p]], jnp.int32), (rows, 1))
  return tokens, positions, jnp.ones((rows, 3), jnp.int32)


def _image_args(latents, image_positions):
  """One clean image (t = 0) per row."""
  rows = latents.shape[0]
  return (latents[:, None], jnp.zeros((rows, 1), jnp.int32), image_positions.reshape(rows, 1),
          jnp.ones((rows, 1), jnp.int32))


def _kv_info(model, image_positions, text_positions, text_segments) -> TokenInfo:
  """TokenInfo of the [image | text] tokens a forward with one image per row returns K/V for."""
  img = image_token_info(image_positions.reshape(-1, 1), jnp.ones((image_positions.shape[0], 1), jnp.int32),
                         model.fcfg.tokens_per_image)
  txt = TokenInfo(text_positions, text_segments, jnp.full(text_positions.shape, -1, jnp.int32))
  return TokenInfo.concat([img, txt])


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill_image_prefix(graphdef, state, latents, cache_len: int):
  """Runs `BOS BOI <image t=0> EOI` for latents [B, H, W, C]; returns (EOI logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  rows = latents.shape[0]
  tokens, pos, segs = _prefix_inputs(rows, model.lcfg, model.fcfg)
  image_pos = jnp.full((rows,), 2, jnp.int32)
  logits, _, (k, v) = model(tokens, pos, segs, *_image_args(latents, image_pos))
  cache = decoder.empty_cache(model.lcfg, rows, cache_len)
  cache = decoder.write_cache(cache, k, v, _kv_info(model, image_pos, pos, segs), 0)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_logits(graphdef, state, latents, tokens, positions, segments):
  """Logits [B, T, V] of the whole sequence (prefix + generated text), recomputed from scratch."""
  model = nnx.merge(graphdef, state)
  image_pos = jnp.full((latents.shape[0],), 2, jnp.int32)
  logits, _, _ = model(tokens, positions, segments, *_image_args(latents, image_pos))
  return logits


def _trim(rows: np.ndarray, eos: Sequence[int]) -> List[List[int]]:
  out = []
  for row in rows.tolist():
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    out.append(row[:stop + 1] if stop is not None else row)
  return out


def _recompute_greedy(model, latents, max_new_tokens: int, eos: Sequence[int], pad_id: int) -> np.ndarray:
  """Greedy decoding by full recomputation: slot 3 + i holds new token i (segment 0 until generated)."""
  graphdef, state = nnx.split(model)
  rows, p = latents.shape[0], model.fcfg.tokens_per_image
  prefix, prefix_pos, _ = _prefix_inputs(rows, model.lcfg, model.fcfg)
  tokens = np.concatenate([np.asarray(prefix), np.full((rows, max_new_tokens), pad_id, np.int32)], axis=1)
  positions = np.concatenate([np.asarray(prefix_pos),
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
    raise ValueError(f"caption: max_new_tokens={max_new_tokens} must be >= 1")
  lcfg, fcfg = model.lcfg, model.fcfg
  latents = _check_latents(latents, fcfg)
  eos = [lcfg.eos_id] if eos_ids is None else list(eos_ids)
  prefix_len = 3 + fcfg.tokens_per_image
  if prefix_len + max_new_tokens > lcfg.max_seq_len:
    raise ValueError(f"caption: image prefix ({prefix_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"max_seq_len={lcfg.max_seq_len}")
  if not use_cache:
    return _trim(_recompute_greedy(model, latents, max_new_tokens, eos, pad_id), eos)
  graphdef, state = nnx.split(model)
  logits, cache = prefill_image_prefix(graphdef, state, latents, cache_len=prefix_len + max_new_tokens)
  text_graphdef, text_state = nnx.split(model.text)
  rows = latents.shape[0]
  out, _ = generate._decode_loop(
      text_graphdef, text_state, logits, cache, jnp.full((rows,), prefix_len, jnp.int32), jnp.int32(prefix_len),
      jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), jnp.asarray(eos if eos else [-1], jnp.int32),
      jnp.int32(pad_id), max_new_tokens=max_new_tokens, greedy=True)
  return _trim(np.asarray(out), eos)


def caption_images(model, tokenizer, latents, *, max_new_tokens: int = 32, batch_size: int = 32) -> List[str]:
  """Caption strings for latents [N, H, W, C], in batches of `batch_size` (the last one padded, so one
  compilation serves all batches). Special tokens are dropped from the decoded text."""
  latents = np.asarray(_check_latents(latents, model.fcfg))
  n = len(latents)
  out = []
  for start in range(0, n, batch_size):
    chunk = latents[start:start + batch_size]
    real = len(chunk)
    if n > batch_size and real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
    ids = caption_latents(model, chunk, max_new_tokens)[:real]
    out.extend(tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids)
  return out


# ---------------------------------------------------------------------------------------------- interleaved


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _append_image(graphdef, state, cache, latent, image_position, index):
  """Writes a clean image (t = 0) at `image_position` and EOI right after it into the cache at slot `index`;
  returns (EOI logits [1, V], cache)."""
  model = nnx.merge(graphdef, state)
  p = model.fcfg.tokens_per_image
  tokens = jnp.full((1, 1), model.fcfg.eoi_id, jnp.int32)
  pos = jnp.reshape(image_position + p, (1, 1)).astype(jnp.int32)
  segs = jnp.ones((1, 1), jnp.int32)
  image_pos = jnp.reshape(image_position, (1,)).astype(jnp.int32)
  logits, _, (k, v) = model(tokens, pos, segs, *_image_args(latent, image_pos), cache=cache)
  cache = decoder.write_cache(cache, k, v, _kv_info(model, image_pos, pos, segs), index)
  return logits[:, -1], cache


def _stack_rows(a: decoder.KVCache, b: decoder.KVCache) -> decoder.KVCache:
  """Concatenates two caches along the batch (k/v axis 1, info axis 0)."""
  return decoder.KVCache(jnp.concatenate([a.k, b.k], axis=1), jnp.concatenate([a.v, b.v], axis=1),
                         TokenInfo(*(jnp.concatenate([x, y], axis=0) for x, y in zip(a.info, b.info))))


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
    raise ValueError("generate_interleaved: empty prompt (it should at least hold BOS)")
  p = fcfg.tokens_per_image
  cache_len = len(prompt) + max_new_tokens + max_images * (p + 1)
  if cache_len > lcfg.max_seq_len:
    raise ValueError(f"generate_interleaved: prompt + {max_new_tokens} tokens + {max_images} images need "
                     f"{cache_len} positions > max_seq_len={lcfg.max_seq_len}")
  graphdef, state = nnx.split(model)
  text_graphdef, text_state = nnx.split(model.text)
  tokens, segs, pos = (jnp.asarray(a) for a in generate.left_pad([prompt]))
  logits, cache = generate.prefill(text_graphdef, text_state, tokens, segs, pos, cache_len=cache_len)
  position = index = len(prompt)
  segments, text, images = [], [], 0
  for _ in range(max_new_tokens):
    tok = int(jnp.argmax(logits[0]))
    text.append(tok)
    if tok == lcfg.eos_id:
      break
    logits, cache = generate.decode_step(text_graphdef, text_state, jnp.asarray([tok], jnp.int32),
                                         jnp.asarray([position], jnp.int32), cache, jnp.int32(index))
    position, index = position + 1, index + 1
    if tok == fcfg.boi_id and images < max_images:
      segments.append(("text", text))
      text = []
      rows, image_pos = cache, [position]
      if generate_image.guided(cfg_scale):
        uncond = generate_image.prefix_arrays([[lcfg.bos_id, fcfg.boi_id]])
        rows = _stack_rows(cache, generate_image.prefill_prefix(graphdef, state, *uncond[:3], cache_len=cache_len))
        image_pos = [position, 2]
      latent = generate_image.sample_from_cache(model, rows, jnp.asarray(image_pos, jnp.int32), diffusion_cfg,
                                                num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale,
                                                seed=seed + images, eta=eta, clip_x0=clip_x0)
      logits, cache = _append_image(graphdef, state, cache, latent[:1], jnp.int32(position), jnp.int32(index))
      segments.append(("image", np.asarray(latent[0])))
      position, index, images = position + p + 1, index + p + 1, images + 1
  if text:
    segments.append(("text", text))
  return segments
