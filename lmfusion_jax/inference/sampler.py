"""The one decode API every kind of generation uses: prefill a prefix into a KV cache, extend the cache with an
image, decode text token by token, denoise an image after the cached prefix, trim at EOS.

  s = Sampler(model)                                 # an LMFusion, or a Llama (text only)
  logits, cache = s.prefill(prompts, cache_len)      # left-padded text prompts [B, P] -> last logits [B, V]
  logits, cache = s.prefill_image(latents, cache_len)  # `BOS BOI <clean image> EOI` per row -> EOI logits
  logits, cache = s.append_image(cache, latent, position, index)   # a clean image + EOI after the cache
  tokens = s.decode(logits, cache, next_positions, start_index, max_new_tokens, ...)   # [B, max_new_tokens]
  latents = s.denoise(cache, image_positions, diffusion_cfg, ...)   # one image per row after its prefix
  trim_at_eos(tokens, eos_ids)

Prompts of different lengths are left-padded to a common length P: padding slots get segment id 0 (never
attended, see models/mask.py) and every real token its own position (0..len-1), so each row computes exactly
what it would alone. Text is decoded with the text weights only (a frozen LMFusion's text outputs are the
Llama's); image tokens go through the image weights. Every step is a jitted pure function of the split
module (`nnx.split`), cached per Sampler; the text decode loop is a `lax.while_loop` that stops once every row
has produced an end-of-sequence token.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax import diffusion
from lmfusion_jax.models import decoder
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.models.mask import TokenInfo, text_info
from lmfusion_jax.errors import UserError

SAMPLERS = ("ddpm", "ddim")


# ------------------------------------------------------------------------------------------- host helpers


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts -> tokens, segment_ids, positions, each int32 [batch, max_len], padded on the left."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("generate: every prompt needs at least one token")
  n = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), n), pad_id, np.int32)
  segs = np.zeros((len(prompts), n), np.int32)
  pos = np.zeros((len(prompts), n), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, n - len(p):] = p
    segs[b, n - len(p):] = 1
    pos[b, n - len(p):] = np.arange(len(p))
  return tokens, segs, pos


def trim_at_eos(rows, eos: Sequence[int]) -> List[List[int]]:
  """Each row up to and including its first token in `eos` (the whole row when it has none)."""
  out = []
  for row in np.asarray(rows).tolist():
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    out.append(row[:stop + 1] if stop is not None else row)
  return out


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float, greedy: bool) -> jax.Array:
  """logits [B, V] -> token ids [B]: argmax when `greedy`, else nucleus sampling at `temperature`
  (the smallest set of most likely tokens whose probability reaches top_p; the top token always stays)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(key, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def guided(cfg_scale: float) -> bool:
  """Whether a guidance scale needs the unconditional rows (w = 1 is the conditional model alone)."""
  return float(cfg_scale) != 1.0


def check_sampler(sampler: str, num_steps: int, dcfg, eta: float) -> None:
  if sampler not in SAMPLERS:
    raise UserError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
  if not 1 <= num_steps <= dcfg.num_timesteps:
    raise UserError(f"num_steps={num_steps}: must be in [1, num_timesteps={dcfg.num_timesteps}]")
  if sampler == "ddpm" and eta != 0.0:
    raise UserError("eta applies to the ddim sampler only")
  if not 0.0 <= eta <= 1.0:
    raise UserError(f"eta={eta}: must be in [0, 1]")


def stack_rows(a: decoder.KVCache, b: decoder.KVCache) -> decoder.KVCache:
  """Concatenates two caches along the batch (k/v axis 1, info axis 0)."""
  return decoder.KVCache(jnp.concatenate([a.k, b.k], axis=1), jnp.concatenate([a.v, b.v], axis=1),
                         TokenInfo(*(jnp.concatenate([x, y], axis=0) for x, y in zip(a.info, b.info))))


def image_prefix(rows: int, lcfg, fcfg) -> TextInputs:
  """Text part of `BOS BOI <image> EOI` [R, 3]; the image sits at position 2, EOI after its tokens."""
  p = fcfg.tokens_per_image
  tokens = jnp.tile(jnp.asarray([[lcfg.bos_id, fcfg.boi_id, fcfg.eoi_id]], jnp.int32), (rows, 1))
  positions = jnp.tile(jnp.asarray([[0, 1, 2 + p]], jnp.int32), (rows, 1))
  return TextInputs(tokens, positions, jnp.ones((rows, 3), jnp.int32))


def clean_images(latents, positions) -> ImageInputs:
  """One clean image (t = 0) per row: latents [R, H, W, C] at positions [R]."""
  return ImageInputs.one_per_row(latents, jnp.zeros((latents.shape[0],), jnp.int32), positions)


def _kv_info(text: TextInputs, image: ImageInputs, tokens_per_image: int) -> TokenInfo:
  """TokenInfo of the [image | text] tokens a fusion forward returns K/V for."""
  return TokenInfo.concat([image.info(tokens_per_image), text.info()])


# ------------------------------------------------------------------------------- jitted steps (pure)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_text(graphdef, state, tokens, segment_ids, positions, cache_len: int):
  """Text prompts [B, P] through the text tower into a fresh cache of `cache_len` slots."""
  model = nnx.merge(graphdef, state)
  logits, (k, v) = model(tokens, positions, segment_ids)
  cache = decoder.empty_cache(model.cfg, tokens.shape[0], cache_len)
  cache = decoder.write_cache(cache, k, v, text_info(positions, segment_ids), 0)
  return logits[:, -1], cache


def _text_step(graphdef, state, tokens, positions, cache, index):
  model = nnx.merge(graphdef, state)
  tok, pos = tokens[:, None], positions[:, None]
  seg = jnp.ones_like(tok)
  logits, (k, v) = model(tok, pos, seg, cache)
  cache = decoder.write_cache(cache, k, v, text_info(pos, seg), index)
  return logits[:, 0], cache


_decode_step = jax.jit(_text_step, static_argnames=("graphdef",))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode_loop(graphdef, state, first_logits, cache, next_positions, start_index, key, temperature, top_p,
                 eos_ids, pad_id, max_new_tokens: int, greedy: bool):
  """Samples up to max_new_tokens per row; rows that emitted an EOS keep emitting `pad_id`."""
  b = first_logits.shape[0]

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, out, done, key = carry
    key, sub = jax.random.split(key)
    tok = sample_token(logits, sub, temperature, top_p, greedy)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    logits, cache = _text_step(graphdef, state, tok, next_positions + i, cache, start_index + i)
    return i + 1, logits, cache, out, done, key

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  carry = (jnp.int32(0), first_logits, cache, out, jnp.zeros((b,), bool), key)
  _, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_image(graphdef, state, latents, cache_len: int):
  """`BOS BOI <image t=0> EOI` for latents [B, H, W, C] -> (EOI logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  rows = latents.shape[0]
  text = image_prefix(rows, model.lcfg, model.fcfg)
  image = clean_images(latents, jnp.full((rows,), 2, jnp.int32))
  logits, _, (k, v) = model(text, image)
  cache = decoder.empty_cache(model.lcfg, rows, cache_len)
  cache = decoder.write_cache(cache, k, v, _kv_info(text, image, model.fcfg.tokens_per_image), 0)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _append_image(graphdef, state, cache, latent, image_position, index):
  """A clean image (t = 0) at `image_position` and EOI right after it, written into the cache at slot
  `index` -> (EOI logits [1, V], cache)."""
  model = nnx.merge(graphdef, state)
  p = model.fcfg.tokens_per_image
  text = TextInputs(jnp.full((1, 1), model.fcfg.eoi_id, jnp.int32),
                    jnp.reshape(image_position + p, (1, 1)).astype(jnp.int32), jnp.ones((1, 1), jnp.int32))
  image = clean_images(latent, jnp.reshape(image_position, (1,)).astype(jnp.int32))
  logits, _, (k, v) = model(text, image, cache=cache)
  cache = decoder.write_cache(cache, k, v, _kv_info(text, image, p), index)
  return logits[:, -1], cache


def run_diffusion(eps_batch_fn, dcfg, rng, n: int, shape: tuple, cfg_scale, eta, is_guided: bool, num_steps: int,
                  sampler: str, clip_x0):
  """The sampling chain (DDPM or DDIM, with classifier-free guidance over [cond | uncond] rows)."""
  eps_fn = diffusion.guided_eps_fn(eps_batch_fn, cfg_scale) if is_guided else eps_batch_fn
  schedule = diffusion.make_schedule(dcfg)
  if sampler == "ddpm":
    return diffusion.ddpm_sample(eps_fn, schedule, rng, (n,) + shape, num_steps, clip_x0=clip_x0)
  return diffusion.ddim_sample(eps_fn, schedule, rng, (n,) + shape, num_steps, eta, clip_x0=clip_x0)


def sampling_key(seed: int, image_ids: Optional[Sequence[int]] = None) -> jax.Array:
  """One key for the batch, or with `image_ids` (int [N]) a key per image: fold_in(key(seed), id), so an
  image's noise depends on its id only (the same image on any batch size, device or process count)."""
  key = jax.random.key(seed)
  if image_ids is None:
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(np.asarray(image_ids), jnp.uint32))


def latent_shape(fcfg) -> tuple:
  """(H, W, C) of one latent."""
  return (fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels)


DIFFUSION_STATIC = ("graphdef", "dcfg", "num_steps", "sampler", "is_guided", "clip_x0")


@functools.partial(jax.jit, static_argnames=DIFFUSION_STATIC)
def _denoise(graphdef, state, cache, image_positions, rng, cfg_scale, eta, *, dcfg, num_steps, sampler,
             is_guided, clip_x0):
  """One image per cache row: each step runs only the image tokens against the cached prefix."""
  model = nnx.merge(graphdef, state)
  rows = image_positions.shape[0]
  no_text = jnp.zeros((rows, 0), jnp.int32)

  def eps_fn(x, t):
    _, eps, _ = model(TextInputs(no_text, no_text, no_text), ImageInputs.one_per_row(x, t, image_positions),
                      cache=cache)
    return eps[:, 0]

  n = rows // 2 if is_guided else rows
  return run_diffusion(eps_fn, dcfg, rng, n, latent_shape(model.fcfg), cfg_scale, eta, is_guided, num_steps,
                       sampler, clip_x0)


# ------------------------------------------------------------------------------------------- the sampler


class Sampler:
  """Cached prefill / decode / denoise over one model (see the module docstring)."""

  def __init__(self, model):
    self.model = model
    self.is_fusion = hasattr(model, "fcfg")
    text = model.text if self.is_fusion else model
    self.lcfg = text.cfg
    self.fcfg = model.fcfg if self.is_fusion else None
    self._text = nnx.split(text)
    self._fusion = nnx.split(model) if self.is_fusion else None

  def _need_fusion(self, what: str):
    if not self.is_fusion:
      raise UserError(f"{what} needs an LMFusion model (this is a text-only Llama)")
    return self._fusion

  def prefill(self, prompts: Sequence[Sequence[int]], cache_len: int, pad_id: int = 0):
    """Left-padded prompts -> (last logits [B, V], cache of `cache_len` slots)."""
    tokens, segs, pos = left_pad(prompts, pad_id)
    return self.prefill_arrays(tokens, segs, pos, cache_len)

  def prefill_arrays(self, tokens, segment_ids, positions, cache_len: int):
    return _prefill_text(*self._text, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions),
                         cache_len=cache_len)

  def prefill_image(self, latents, cache_len: int):
    return _prefill_image(*self._need_fusion("prefill_image"), jnp.asarray(latents), cache_len=cache_len)

  def append_image(self, cache, latent, image_position: int, index: int):
    return _append_image(*self._need_fusion("append_image"), cache, latent, jnp.int32(image_position),
                         jnp.int32(index))

  def decode_step(self, cache, tokens, positions, index: int):
    """One token per row ([B]) at `positions`, attending to the cache; writes its K/V at slot `index`."""
    return _decode_step(*self._text, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), cache,
                        jnp.int32(index))

  def decode(self, first_logits, cache, next_positions, start_index: int, max_new_tokens: int, *,
             eos_ids: Sequence[int], pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> np.ndarray:
    """New tokens [B, max_new_tokens]: token i of a row sits at position next_positions + i and cache slot
    start_index + i; greedy when temperature == 0. Rows past their first EOS hold `pad_id`."""
    out = _decode_loop(*self._text, first_logits, cache, jnp.asarray(next_positions, jnp.int32),
                       jnp.int32(start_index), jax.random.key(seed), jnp.float32(max(temperature, 1e-6)),
                       jnp.float32(top_p), jnp.asarray(list(eos_ids) or [-1], jnp.int32), jnp.int32(pad_id),
                       max_new_tokens=max_new_tokens, greedy=temperature == 0)
    return np.asarray(out)

  def denoise(self, cache: decoder.KVCache, image_positions, diffusion_cfg, *, num_steps: int = 250,
              sampler: str = "ddpm", cfg_scale: float = 1.0, seed: int = 0, eta: float = 0.0,
              clip_x0: Optional[float] = None, image_ids: Optional[Sequence[int]] = None) -> jax.Array:
    """Denoises one image per cache row after the cached prefix; returns latents float32 [N, H, W, C].
    `image_ids` (int [N]): image n's noise comes from (seed, image_ids[n]) alone, whatever its batch.

    cache: [R rows] holding each row's prefix (empty slots: segment 0); image_positions int [R]: the position
    of each row's first image token. With guidance (cfg_scale != 1) rows [0, N) are conditional and [N, 2N)
    unconditional (R = 2N); otherwise R = N."""
    check_sampler(sampler, num_steps, diffusion_cfg, eta)
    image_positions = jnp.asarray(image_positions, jnp.int32)
    g = guided(cfg_scale)
    if g and image_positions.shape[0] % 2:
      raise ValueError(f"guided sampling needs 2N cache rows (conditional then unconditional), got "
                       f"{image_positions.shape[0]}")
    return _denoise(*self._need_fusion("denoise"), cache, image_positions, sampling_key(seed, image_ids),
                    jnp.float32(cfg_scale), jnp.float32(eta), dcfg=diffusion_cfg, num_steps=num_steps,
                    sampler=sampler, is_guided=g, clip_x0=clip_x0)
