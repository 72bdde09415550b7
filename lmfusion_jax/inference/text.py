"""Text generation with a KV cache (inference.sampler): prefill the left-padded prompts once, then decode.

  generate(model, prompts, max_new_tokens, ...) -> new token ids per prompt (stopping at EOS)

`model` is a Llama (e.g. `models.sharded.model(lcfg, None, {"text": params})`) or an LMFusion (its text
weights are used).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

from lmfusion_jax.inference.sampler import Sampler, trim_at_eos
from lmfusion_jax.errors import UserError


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0) -> List[List[int]]:
  """New token ids for each prompt: greedy when temperature == 0, else temperature/top-p sampling.

  A row stops after its first token in `eos_ids` (that token is included, as transformers does);
  `eos_ids=None` uses the model config's eos_id, `()` never stops early.
  """
  if max_new_tokens < 1:
    raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if not (math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1):
    raise UserError(f"generate: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
  sampler = Sampler(model)
  cfg = sampler.lcfg
  eos = [cfg.eos_id] if eos_ids is None else list(eos_ids)
  p = max((len(x) for x in prompts), default=0)
  if p + max_new_tokens > cfg.max_seq_len:
    raise UserError(f"generate: prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"max_seq_len={cfg.max_seq_len}")
  logits, cache = sampler.prefill(prompts, cache_len=p + max_new_tokens, pad_id=pad_id)
  out = sampler.decode(logits, cache, [len(x) for x in prompts], p, max_new_tokens, eos_ids=eos, pad_id=pad_id,
                       temperature=temperature, top_p=top_p, seed=seed)
  return trim_at_eos(out, eos)
