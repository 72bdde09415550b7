"""Text NLL of held-out captions as plain text documents `BOS caption EOS`, with a text-only forward
(unchanged by LMFusion training when the text is frozen). Documents are packed into rows by data.packing,
the packer training rows go through."""
from __future__ import annotations

import math
from typing import Sequence

import jax

from lmfusion_jax.data.batch import TEXT_KEYS, global_batch
from lmfusion_jax.data.packing import empty_row, pack_documents
from lmfusion_jax.data.sequences import text_document
from lmfusion_jax.evaluation import distributed
from lmfusion_jax.evaluation.setup import EvalSetup, batch_rows, stack_batches
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.models.inputs import TextInputs
from lmfusion_jax.progress import Progress
from lmfusion_jax.training.losses import lm_loss


def text_nll(params, lcfg, fcfg, batches: list, mesh, progress_desc: str = "") -> tuple[float, int]:
  """(mean NLL per target token, number of target tokens) with a text-only forward; batches done are
  reported under `progress_desc` when given."""

  @jax.jit
  def nll(params, b):
    logits, _, _ = sharded.model(lcfg, fcfg, params)(TextInputs.from_batch(b))
    _, n, total = lm_loss(logits, b["targets"], b["loss_mask"])
    return total, n

  mine = distributed.share(range(len(batches)))   # several processes: each takes every P-th batch
  local = {}
  with jax.set_mesh(mesh), Progress(len(mine), progress_desc, "batch",
                                    enabled=None if progress_desc else False) as progress:
    for i in mine:
      t, n = nll(params, global_batch(batches[i], mesh))
      local[i] = [float(t), float(n)]
      progress.update(1)
  every = distributed.gather_json(local)
  total, count = 0.0, 0.0
  for i in range(len(batches)):   # summed in batch order: the same number on any process count
    total, count = total + every[i][0], count + every[i][1]
  return total / max(count, 1.0), int(count)


def held_out_text_metrics(params, lcfg, fcfg, data_cfg, caption_ids: Sequence[Sequence[int]], mesh,
                          progress_desc: str = "") -> dict:
  """text_nll / text_perplexity / text_tokens of `BOS caption EOS` documents (text-only forward)."""
  text_len = int(data_cfg.text_len)
  docs = []
  for i, ids in enumerate(caption_ids):
    if len(ids) + 2 > text_len:
      raise ConfigError(f"a caption of {len(ids)} tokens does not fit data.text_len={text_len}")
    docs.append(text_document(str(i), [lcfg.bos_id, *ids, lcfg.eos_id]))
  rows = [{k: r[k] for k in TEXT_KEYS} for r in pack_documents(docs, text_len, 0, (1, 1, 1))]
  empty = {k: v for k, v in empty_row(text_len, 0, (1, 1, 1)).items() if k in TEXT_KEYS}
  nll, n_tok = text_nll(params, lcfg, fcfg, stack_batches(rows, batch_rows(data_cfg, mesh), empty), mesh,
                        progress_desc)
  return {"text_nll": nll, "text_perplexity": math.exp(nll), "text_tokens": n_tok}




class TextNLL:
  """Evaluator `text_nll`: text_nll, text_perplexity, text_tokens."""
  name = "text_nll"

  def run(self, s: EvalSetup) -> dict:
    lm = s.loaded
    return held_out_text_metrics(lm.params, lm.llama, lm.fusion, s.cfg.data, s.caption_ids, lm.mesh,
                                 "eval text_nll")
