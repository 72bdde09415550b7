"""`evaluate(checkpoint, config, overrides)`: held-out metrics of a checkpoint, restored onto ANY mesh.

One evaluator per metric family, chosen by `config.eval.evaluators` (in the spirit of big_vision's evaluators):
  text_nll         text_nll, text_perplexity, text_tokens              (evaluation/text_nll.py)
  diffusion_loss   diffusion_loss_t{t}, diffusion_loss_mean             (evaluation/diffusion_loss.py)
  captioning       cider_d, caption_accuracy, caption_examples          (evaluation/captioning.py)
  generation       num_generated, generation_accuracy, fid              (evaluation/generation.py)
The dataset supplies references and prompts (lmfusion_jax.data.eval_sets). Everything is deterministic (fixed
eval records, fixed noise seeds, greedy captions), so the same checkpoint gives the same numbers on any device
count / mesh (up to float reduction order). Sizes (`config.eval`, defaults in `setup.default_eval_config()`,
override with --config.eval.k=v) keep CI runs small. On several processes each holds the model on its own
devices and takes every P-th batch / record / prompt; results are gathered once (evaluation.distributed), so
1 process x 4 devices and 2 processes x 2 devices give the same numbers.
"""
from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from lmfusion_jax.evaluation.captioning import Captioning
from lmfusion_jax.evaluation.diffusion_loss import DiffusionLoss
from lmfusion_jax.evaluation.generation import Generation
from lmfusion_jax.evaluation.setup import EVALUATORS, prepare
from lmfusion_jax.evaluation.text_nll import TextNLL, held_out_text_metrics
from lmfusion_jax.models.config import ConfigError


def make_evaluators(names: Sequence[str], feature_fn=None) -> list:
  """The evaluators named in `names` (eval.evaluators), in the order given."""
  known = {"text_nll": TextNLL, "diffusion_loss": DiffusionLoss, "captioning": Captioning,
           "generation": lambda: Generation(feature_fn)}
  assert set(known) == set(EVALUATORS)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ConfigError(f"eval.evaluators: unknown {unknown} (have {list(EVALUATORS)})")
  return [known[n]() for n in names]


def evaluate(checkpoint, config=None, overrides: Sequence[str] = (), *, mesh=None, step: Optional[int] = None,
             feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             tokenizer_dir: Optional[str] = None) -> dict:
  """Metrics of `checkpoint` (training workdir, step dir or params checkpoint) as a JSON-able dict."""
  setup = prepare(checkpoint, config, overrides, mesh=mesh, step=step, tokenizer_dir=tokenizer_dir)
  evaluators = make_evaluators(list(setup.cfg.eval.evaluators), feature_fn)
  result = {"checkpoint": str(checkpoint), "num_examples": len(setup.records), "devices": len(jax.devices()),
            "processes": jax.process_count()}
  for evaluator in evaluators:
    result.update(evaluator.run(setup))
  return result


def evaluate_text_nll(checkpoint, config=None, overrides: Sequence[str] = (), *, mesh=None) -> dict:
  """Only the held-out text metrics of `checkpoint` (e.g. of the converted base model, to show that LMFusion
  training left the text side's outputs bit-identical)."""
  s = prepare(checkpoint, config, overrides, mesh=mesh)
  lm = s.loaded
  return held_out_text_metrics(lm.params, lm.llama, lm.fusion, s.cfg.data, s.caption_ids, lm.mesh)


def to_json(result: dict) -> str:
  return json.dumps(result, sort_keys=True)
