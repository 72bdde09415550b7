"""The text branch of any checkpoint as an lm-evaluation-harness model (`lm_eval.api.model.TemplateLM`).

  lm = HarnessLM(checkpoint, tokenizer=None, batch_size=8)
  lm_eval.simple_evaluate(model=lm, tasks=[...])       # lm-eval's own results structure

Tokenization, context/continuation splitting and empty-context handling are lm-eval's own (TemplateLM), with
`tok_encode` as its `hf` model does it (the tokenizer's special tokens unless the text already starts with
BOS), so per-request log-likelihoods match lm-eval's `hf` model on the same weights. Scoring runs one jitted
forward per batch of right-padded rows (lengths rounded up to a multiple of 64, so few shapes compile) and
returns only per-token log-probabilities and greedy hits to the host, never [batch, seq, vocab] logits.
The parameters are restored sharded over this process's devices (a ("data", "fsdp", "tensor") mesh) and the
rows of a batch are split over its data x fsdp axes (the batch size is rounded up to a multiple of them). On
several processes each holds its own copy and lm-eval splits the documents by rank (its data-parallel mode:
rank = jax.process_index(); the gathers go through JAX's multi-host collectives), so 1 x 4 devices and 2 x 2
give the same results.
Rows longer than the model's max_seq_len keep their last max_seq_len tokens, as lm-eval's `hf` model does.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lm_eval.api.model import TemplateLM

from lmfusion_jax.models import sharded

BUCKET = 64


def _score_fn(lcfg):
  """jit(params, tokens [B, L], targets [B, L]) -> (log p(target) [B, L], target == argmax [B, L])."""

  @jax.jit
  def score(params, tokens, targets):
    logits, _ = sharded.model(lcfg, None, params)(tokens)      # [B, L, vocab] fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
  return score


class HarnessLM(TemplateLM):
  """lm-eval model over the `text` branch of a params checkpoint, training workdir or step dir."""

  def __init__(self, checkpoint, tokenizer: Optional[str] = None, batch_size: int = 8,
               max_gen_toks: int = 256, dtype: Optional[str] = None):
    super().__init__()
    from lmfusion_jax.data.tokenizer import load_tokenizer
    from lmfusion_jax.inference import loading
    from lmfusion_jax.models.config import ConfigError
    tok_dir = tokenizer or loading.checkpoint_tokenizer(checkpoint)
    if not tok_dir:
      raise ConfigError(f"--checkpoint {checkpoint}: no tokenizer travels with it; pass --tokenizer DIR")
    self.tokenizer = load_tokenizer(tok_dir)
    from lmfusion_jax.evaluation import distributed
    self.mesh = distributed.process_mesh()      # parameters sharded over this process's devices, rows over data x fsdp
    # several processes: lm-eval gives rank r the documents r, r + P, ... and gathers the metrics (rank, world
    # size, all_gather, gather_object and barrier below are the hooks it calls)
    self._rank, self._world_size = jax.process_index(), jax.process_count()
    self.lcfg, self.params = loading.load_text(checkpoint, dtype=dtype, mesh=self.mesh)
    self.params = {"text": self.params}
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = -(-int(batch_size) // shards) * shards   # a whole number of rows per batch shard
    self._rows = NamedSharding(self.mesh, P(("data", "fsdp"), None))
    self.max_gen_toks = int(max_gen_toks)
    self._score = _score_fn(self.lcfg)

  # --- lm-eval's data-parallel hooks (used when world_size > 1) -------------------------------------------

  @property
  def device(self):
    import torch
    return torch.device("cpu")   # where lm-eval puts the request counts it all_gathers

  def all_gather(self, tensor):
    """A torch tensor of every rank, concatenated along dim 0 (scalars become [world_size])."""
    import torch
    from jax.experimental import multihost_utils
    x = tensor.detach().cpu().numpy()
    every = np.asarray(multihost_utils.process_allgather(x.reshape((1,) + x.shape) if x.ndim == 0 else x,
                                                         tiled=True))
    return torch.from_numpy(every)

  def gather_object(self, obj, dst: int = 0):
    """Every rank's `obj` (pickled through JAX's collectives between our own processes), on `dst` only."""
    import pickle
    from lmfusion_jax.evaluation.distributed import allgather_bytes
    every = [pickle.loads(b) for b in allgather_bytes(pickle.dumps(obj))]
    return every if self._rank == dst else None

  def barrier(self) -> None:
    from lmfusion_jax.evaluation.distributed import barrier
    barrier("lm-eval")

  # --- what TemplateLM asks for -------------------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return int(self.lcfg.max_seq_len)

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list:
    if add_special_tokens is None:
      bos = self.tokenizer.bos_token
      add_special_tokens = not (bos and string.startswith(bos))
      return self.tokenizer.encode(string, **({} if add_special_tokens else {"add_special_tokens": False}))
    return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
    return super().loglikelihood(requests, disable_tqdm=True)   # progress: ours, per batch (below)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
    """[(key, context ids, continuation ids)] -> [(sum log p(continuation | context), greedy?)]."""
    rows = []
    for _, context, continuation in requests:
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole, min(len(continuation), len(whole) - 1)))
    from lmfusion_jax.progress import Progress
    out = []
    progress = Progress(len(rows), "eval-text", unit="request", enabled=None if len(rows) > self.batch_size else False)
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      length = min(self.max_length, -(-max(len(w) - 1 for w, _ in chunk) // BUCKET) * BUCKET)
      tokens = np.zeros((self.batch_size, length), np.int32)     # [batch, L], right-padded
      targets = np.zeros((self.batch_size, length), np.int32)
      for i, (whole, _) in enumerate(chunk):
        tokens[i, :len(whole) - 1] = whole[:-1]
        targets[i, :len(whole) - 1] = whole[1:]
      with jax.set_mesh(self.mesh):
        logp, hit = jax.device_get(self._score(self.params, jax.device_put(tokens, self._rows),
                                               jax.device_put(targets, self._rows)))
      for i, (whole, n_cont) in enumerate(chunk):
        end = len(whole) - 1
        window = slice(end - n_cont, end)
        out.append((float(np.sum(logp[i, window], dtype=np.float64)), bool(np.all(hit[i, window]))))
      progress.update(len(chunk))
    progress.close()
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
    """Sum of log-likelihoods of each whole text, in disjoint windows of max_length (as lm-eval's `hf`)."""
    from lm_eval import utils
    out = []
    for (string,) in [r.args for r in requests]:
      windows = [(None,) + utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)]
      out.append(sum(lp for lp, _ in self._loglikelihood_tokens(windows)))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list:
    """Greedy continuation of each context, cut before the first `until` string (and at EOS)."""
    from lmfusion_jax.inference.text import generate
    model = sharded.model(self.lcfg, None, self.params)
    out = []
    for context, gen_kwargs in [r.args for r in requests]:
      until = gen_kwargs.get("until", [])
      until = [until] if isinstance(until, str) else list(until)
      limit = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
      ids = self.tok_encode(context)[-(self.max_length - limit):]
      new = generate(model, [ids], limit, eos_ids=[self.eot_token_id])[0]
      text = self.tokenizer.decode(new, skip_special_tokens=True)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out
