"""`lmfusion-jax demo`: the whole method end to end on the embedded digits data (CPU)."""
from __future__ import annotations

import argparse
import json

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = """Stages (each skipped when its output exists in the workdir; training resumes):
  dataset + tokenizer -> text LM pretraining -> HF export -> convert-llama -> LMFusion training (text
  frozen) -> eval -> samples grid -> WORKDIR/report.md

examples:
  lmfusion-jax demo --workdir /tmp/lmfusion-demo
  lmfusion-jax demo --workdir /tmp/demo-ci --config configs/demo_digits.py:ci
  lmfusion-jax demo --workdir /tmp/demo --config.total_steps=5000
  lmfusion-jax demo --workdir /tmp/llavafusion --config configs/demo_llava_digits.py   # LLaVAFusion:
      a tiny LLaVA pretrained here -> HF export -> convert-llava -> LMFusion with text and vision frozen"""
  p.add_argument("--workdir", required=True, help="where everything is written (created if missing)")
  p.add_argument("--config", default="configs/demo_digits.py",
                 help="demo config (default: configs/demo_digits.py; ':ci' for a CI-sized run)")
  p.add_argument("--json", action="store_true", help="print the metrics as JSON at the end")


def run(args) -> int:
  from lmfusion_jax.run_config import apply_overrides, load_config
  cfg = apply_overrides(load_config(args.config), args.overrides)
  cfg.workdir = args.workdir
  if cfg.get("demo", {}).get("llava"):     # configs/demo_llava_digits.py: the LLaVAFusion demo
    from lmfusion_jax.demo_llava import run_llava_demo as run_demo
  else:
    from lmfusion_jax.demo import run_demo
  out = run_demo(cfg)
  if args.json:
    print(json.dumps(out["metrics"], sort_keys=True, default=str))
  return 0
