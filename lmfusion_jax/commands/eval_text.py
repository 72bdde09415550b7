"""`lmfusion-jax eval-text`: lm-evaluation-harness text tasks on the text branch of any checkpoint.

  lmfusion-jax eval-text --checkpoint WORKDIR --tasks hellaswag,siqa,winogrande --out results.json
  lmfusion-jax eval-text --checkpoint CKPT --tasks my_task --include-path my_tasks/ --limit 100

The model is lmfusion_jax.evaluation.lm_harness.HarnessLM (log-likelihoods as lm-eval's `hf` model computes
them); results.json is lm-eval's own results structure (results[task]["acc,none"], ...). Offline: save the
datasets once with lm-eval's tooling (or as local YAML + jsonl tasks) and point --include-path at them.
"""
from __future__ import annotations

import argparse
import difflib
import json

from lmfusion_jax.commands.arg_types import non_empty_str, output_file, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="params checkpoint (convert-llama), training workdir or step dir; its text branch is scored")
  p.add_argument("--tasks", required=True, type=non_empty_str, help="comma-separated lm-eval task names")
  p.add_argument("--include-path", default=None, help="folder of extra task YAMLs (lm-eval's --include_path)")
  p.add_argument("--limit", type=positive_int, default=None, help="at most this many documents per task")
  p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward (default: %(default)s)")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one with the checkpoint)")
  p.add_argument("--out", required=True, type=output_file, help="results.json to write (lm-eval's structure)")


def run(args) -> int:
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import handle_non_serializable
  from lmfusion_jax.checkpoints.files import absolute_path, write_text
  from lmfusion_jax.errors import UserError
  from lmfusion_jax.evaluation.lm_harness import HarnessLM
  from lmfusion_jax import logs
  if not logs.verbose():   # lm-eval's notes on task defaults (aggregation=mean, ...) only with --verbose
    import logging
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval.evaluator   # its git hash of the working directory: `git describe` prints "fatal: not a git
    lm_eval.evaluator.get_git_commit_hash = lambda: None   # repository" outside one; not ours to report anyway
  manager = TaskManager(include_path=absolute_path(args.include_path) if args.include_path else None)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  known = set(manager.all_tasks)
  for t in tasks:
    if t not in known:
      close = difflib.get_close_matches(t, sorted(known), n=5)
      raise UserError(f"--tasks: lm-eval knows no task {t!r}" + (f" (close: {', '.join(close)})" if close else
                                                                    " (add its YAML with --include-path)"))
  from lmfusion_jax.run_config import base_config
  from lmfusion_jax.training import distributed
  distributed.initialize(base_config().distributed)   # several processes: from the environment
  lm = HarnessLM(args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size)
  results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                    log_samples=False)
  if results is None:   # not rank 0: lm-eval gathered this process's metrics to rank 0, which writes them
    return 0
  text = json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results},
                    indent=2, default=handle_non_serializable, sort_keys=True)
  write_text(absolute_path(args.out), text + "\n")
  for task, metrics in sorted(results["results"].items()):
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float))
    print(f"{task}: {shown}")
  print(f"wrote {args.out}")
  return 0
