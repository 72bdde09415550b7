"""Greedy captions of the eval images (`BOS BOI image EOI` -> text): CIDEr-D against the dataset's references,
and for labelled data the share of captions naming exactly the true class."""
from __future__ import annotations

import numpy as np

from lmfusion_jax.data import eval_sets
from lmfusion_jax.evaluation import metrics
from lmfusion_jax.evaluation import distributed
from lmfusion_jax.evaluation.setup import EvalSetup
from lmfusion_jax.inference.caption import caption_images


class Captioning:
  """Evaluator `captioning`: cider_d, caption_accuracy (labelled data), caption_examples."""
  name = "captioning"

  def run(self, s: EvalSetup) -> dict:
    ev = s.cfg.eval
    mine = distributed.share(range(len(s.records)))   # several processes: each captions every P-th record
    local = {}
    if mine:
      latents = np.stack([s.records[i]["latent"] for i in mine])
      local = dict(zip(mine, caption_images(s.model, s.tokenizer, latents,
                                            max_new_tokens=int(ev.caption_max_new_tokens),
                                            batch_size=int(ev.batch_size), progress_desc="eval captioning")))
    every = distributed.gather_json(local)
    captions = [every[i] for i in range(len(s.records))]
    refs = {i: eval_sets.references(s.cfg.data.dataset, r) for i, r in enumerate(s.records)}
    out = {"cider_d": metrics.cider_d(dict(enumerate(captions)), refs)[0]}
    if all(r["label"] is not None for r in s.records):
      out["caption_accuracy"] = metrics.caption_accuracy(captions, [r["label"] for r in s.records])
    out["caption_examples"] = [{"caption": c, "reference": refs[i][0]} for i, c in enumerate(captions[:5])]
    return out
