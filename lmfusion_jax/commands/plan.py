"""`lmfusion-jax plan`: will this run fit on a TPU slice, and how fast will it go? Compiles the real train
step for the topology on this (CPU) host; needs libtpu (`pip install '.[tpu]'`). Exit code 1 when the step
does not fit in HBM."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lmfusion_jax.planning.search import DEFAULT_ACCUM, DEFAULT_POLICIES

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = """examples:
  lmfusion-jax plan --config configs/llama3_8b_lmfusion.py:v5p-128 --topology v5p-128
  lmfusion-jax plan --config configs/llama3_8b_dense.py:v5p-256 --topology v5p-256 --json
  lmfusion-jax plan --config configs/llama3_8b_lmfusion.py --topology v5p-128 --num-slices 2 \\
      --config.mesh.data=2 --config.data.global_batch_size=512

  lmfusion-jax plan --config configs/llama3_8b_lmfusion.py:v5p-128 --topology v5p-128 --search \\
      --search-remat full,save_qkv_attn,dots_saveable --search-accum 1,2

Topologies: v4-N / v5p-N (N TensorCores = 2 per chip), v5e-N (= v5litepod-N) / v6e-N (N chips), or an
explicit chip grid such as v5p:4x4x12. HBM per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
Cost figures come from unrolled compiles (a scanned layer loop is costed once): --cost scaled (default)
compiles 2 and 3 unrolled layers and extrapolates; --cost unrolled compiles every layer (exact, slow).
Cost compiles turn windowed einsums off (their loop would be costed once too); cost figures that still
cannot be right (a windowed-einsum loop left, or FLOPs under what the step must compute) get a WARNING line
and no step time or MFU. Every figure is the TPU compiler's estimate on this host, not a TPU measurement.
MFU: required FLOPs (frozen weights 4x, trained 6x, causal attention) and MaxText's convention
(calculate_tflops_training_per_device); HFU from the compiled FLOPs (lmfusion_jax/planning/flops.py)."""
  p.add_argument("--config", required=True, help="config file, e.g. configs/llama3_8b_lmfusion.py:v5p-128")
  p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-128, v4-64, v5e-256, v6e-64")
  p.add_argument("--num-slices", type=int, default=1, help="multi-slice (DCN) count; the mesh's data axis "
                                                             "must be a multiple of it")
  p.add_argument("--cost", choices=("scaled", "unrolled", "none"), default="scaled",
                 help="how the per-step cost figures are computed (default: scaled)")
  p.add_argument("--json", action="store_true", help="print the report as one JSON object")
  p.add_argument("--search", action="store_true",
                 help="plan every remat policy x accumulation candidate at the run's global batch and print a "
                      "table and the fastest that fits as a --config. override line (one plan per candidate)")
  p.add_argument("--search-remat", default=",".join(DEFAULT_POLICIES),
                 help="remat policies to try (default: %(default)s)")
  p.add_argument("--search-accum", default=",".join(str(a) for a in DEFAULT_ACCUM),
                 help="gradient accumulation steps to try (default: %(default)s)")


def run(args) -> int:
  from lmfusion_jax.planning import plan as plan_lib
  from lmfusion_jax.planning import report as report_lib
  from lmfusion_jax.run_config import apply_overrides, load_config
  cfg = apply_overrides(load_config(args.config), args.overrides)
  progress = lambda msg: print(f"plan: {msg}", file=sys.stderr, flush=True)  # noqa: E731
  if args.search:
    from lmfusion_jax.errors import UserError
    from lmfusion_jax.planning import search as search_lib
    try:
      accums = [int(a) for a in args.search_accum.split(",") if a.strip()]
    except ValueError:
      raise UserError(f"--search-accum {args.search_accum!r}: comma-separated integers") from None
    policies = [p.strip() for p in args.search_remat.split(",") if p.strip()]
    rows = search_lib.search(cfg, args.topology, policies, accums, args.num_slices, args.cost, progress)
    best = search_lib.fastest(rows)
    if args.json:
      print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows],
                        "fastest": best.overrides if best else None}, sort_keys=True))
    else:
      print(search_lib.format_search(rows, args.topology))
    return 0 if best else 1
  report = plan_lib.plan(cfg, args.topology, num_slices=args.num_slices, cost_mode=args.cost,
                         progress=lambda msg: print(f"plan: {msg}", file=sys.stderr, flush=True))
  if args.json:
    print(json.dumps(report.to_dict(), sort_keys=True))
  else:
    print(report_lib.format_report(report))
  if not report.fits:
    print(f"lmfusion-jax plan: {report_lib.not_fit_message(report)}", file=sys.stderr)
    return 1
  return 0
