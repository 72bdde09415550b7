"""`lmfusion-jax train`: train LMFusion (image side; text frozen unless optim.text_lr > 0)."""
from __future__ import annotations

import argparse
import json

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = """examples:
  lmfusion-jax train --config configs/tiny.py --config.workdir=run      # digits data + tokenizer from the cache
  lmfusion-jax train --config configs/llama3_8b_lmfusion.py --config.workdir=gs://bucket/run \\
      --config.init_from=gs://bucket/llama3-8b-converted --config.data.data_dir=gs://bucket/tfds
  lmfusion-jax train --config configs/tiny.py --config.workdir=run --config.init_from=ckpt \\
      --config.model.preset=init          # the model (and U-Net) dimensions from init_from's lmfusion.json

Any config field can be overridden with --config.<field>=<value> (nested: --config.optim.image_lr=3e-4).
Paths may be relative; they are stored absolute. The tokenizer defaults to the one that travels with
init_from. The run resumes from the workdir's newest good checkpoint (a damaged newest one is set aside
with a warning). One trainer per workdir (WORKDIR/lock.json). SIGTERM or Ctrl-C: the current step is saved,
the save awaited, then exit 0 (all hosts stop at the same step); a second Ctrl-C aborts.
Exit codes: 0 done or stopped after its save, 2 bad input, 3 non-finite loss."""
  p.add_argument("--config", required=True,
                 help="config file defining get_config(arg), e.g. configs/tiny.py or configs/tiny.py:synthetic")
  p.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def run(args) -> int:
  from lmfusion_jax.run_config import apply_overrides, load_config
  from lmfusion_jax.training.loop import NonFiniteLossError, train
  cfg = apply_overrides(load_config(args.config), args.overrides)
  try:
    metrics = train(cfg)
  except NonFiniteLossError as e:
    print(f"lmfusion-jax train: {e}")
    return 3
  if args.json:
    print(json.dumps(metrics, sort_keys=True))
  return 0
