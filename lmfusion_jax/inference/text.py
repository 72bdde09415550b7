"""Text generation with a KV cache: prefill the (left-padded) prompts once, then decode token by token.

A batch of prompts of different lengths is left-padded to a common length P: padding slots get
segment_id 0 (never attended, see models/attention.py) and every real token its own position
(0..len-1), so each row computes exactly what it would alone. The cache holds P + max_new_tokens slots;
decode step i writes slot P + i.

  prefill(graphdef, state, tokens, segment_ids, positions, cache_len) -> (last logits [B, V], cache)
  decode_step(graphdef, state, tokens [B], positions [B], cache, index) -> (logits [B, V], cache)
  generate(model, prompts, max_new_tokens, ...) -> new token ids per prompt (stopping at EOS)

All three are jitted pure functions of the split model (`nnx.split`); the decode loop is a
`lax.while_loop` that stops once every row has produced an end-of-sequence token.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.models import decoder
from lmfusion_jax.models.attention import TokenInfo
from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.models.llama import Llama
from lmfusion_jax.models.params import abstract_split


def text_model(cfg: LlamaConfig, text_params: dict) -> Llama:
  """A Llama module holding `text_params` (a pure dict, e.g. `params_io.load_params(..., subtree="text")`)."""
  graphdef, state = abstract_split(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, text_params))
  return nnx.merge(graphdef, state)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts -> tokens, segment_ids, positions, each int32 [batch, max_len], padded on the left."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  n = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), n), pad_id, np.int32)
  segs = np.zeros((len(prompts), n), np.int32)
  pos = np.zeros((len(prompts), n), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, n - len(p):] = p
    segs[b, n - len(p):] = 1
    pos[b, n - len(p):] = np.arange(len(p))
  return tokens, segs, pos


def _text_info(positions, segment_ids) -> TokenInfo:
  return TokenInfo(positions, segment_ids, jnp.full(positions.shape, -1, jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill(graphdef, state, tokens, segment_ids, positions, cache_len: int):
  """Runs the prompts [B, P] and stores their K/V in a fresh cache of `cache_len` slots."""
  model = nnx.merge(graphdef, state)
  logits, (k, v) = model(tokens, positions, segment_ids)
  cache = decoder.empty_cache(model.cfg, tokens.shape[0], cache_len)
  cache = decoder.write_cache(cache, k, v, _text_info(positions, segment_ids), 0)
  return logits[:, -1], cache


def _step(graphdef, state, tokens, positions, cache, index):
  model = nnx.merge(graphdef, state)
  tok, pos = tokens[:, None], positions[:, None]
  seg = jnp.ones_like(tok)
  logits, (k, v) = model(tok, pos, seg, cache)
  cache = decoder.write_cache(cache, k, v, _text_info(pos, seg), index)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def decode_step(graphdef, state, tokens, positions, cache, index):
  """One token per row ([B]) at `positions`, attending to the cache; writes its K/V at slot `index`."""
  return _step(graphdef, state, tokens, positions, cache, index)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode_loop(graphdef, state, first_logits, cache, next_positions, prompt_len, key, temperature, top_p,
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
    logits, cache = _step(graphdef, state, tok, next_positions + i, cache, prompt_len + i)
    return i + 1, logits, cache, out, done, key

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  carry = (jnp.int32(0), first_logits, cache, out, jnp.zeros((b,), bool), key)
  n, _, _, out, done, _ = jax.lax.while_loop(cond, body, carry)
  return out, n


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0) -> List[List[int]]:
  """New token ids for each prompt: greedy when temperature == 0, else temperature/top-p sampling.

  A row stops after its first token in `eos_ids` (that token is included, as transformers does);
  `eos_ids=None` uses the model config's eos_id, `()` never stops early.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
  cfg = model.cfg
  eos = [cfg.eos_id] if eos_ids is None else list(eos_ids)
  tokens, segs, pos = left_pad(prompts, pad_id)
  if tokens.shape[1] + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"generate: prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"max_seq_len={cfg.max_seq_len}")
  graphdef, state = nnx.split(model)
  p = tokens.shape[1]
  logits, cache = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos),
                          cache_len=p + max_new_tokens)
  lengths = jnp.asarray([len(x) for x in prompts], jnp.int32)
  out, _ = _decode_loop(graphdef, state, logits, cache, lengths, jnp.int32(p), jax.random.key(seed),
                        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                        jnp.asarray(eos if eos else [-1], jnp.int32), jnp.int32(pad_id),
                        max_new_tokens=max_new_tokens, greedy=temperature == 0)
  out = np.asarray(out)
  results = []
  for row in out:
    row = row.tolist()
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    results.append(row[:stop + 1] if stop is not None else row)
  return results
