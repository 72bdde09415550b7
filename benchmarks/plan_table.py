"""The `plan` table: Llama-3-8B LMFusion vs the dense (Transfusion-style) baseline on v5p-64/128/256.

  python benchmarks/plan_table.py [--cost scaled|unrolled] [--out DIR] [--topologies v5p-64 v5p-128 ...]
                                  [--variant NAME --config.k=v ...]

Each cell is one `lmfusion-jax plan --json` run in its own process: three 8B compiles (the scanned step
for memory, 2 and 3 unrolled layers for cost), ~20-30 minutes and ~6 GB RAM on a 2-core host; the
planner's progress lines are passed through to stderr. Results are kept as JSON under --out, so an interrupted
table resumes where it stopped; `--variant NAME --config.k=v ...` plans a variant (e.g. another remat
policy or mesh) with those overrides applied to every config. Needs libtpu (`pip install '.[tpu]'`).
Prints a markdown table: HBM need per chip, compiled FLOPs per step, the compiler's step-time estimate,
tokens/s per chip and the MFU estimates (6ND + attention, and the FLOPs the step actually requires).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

CONFIGS = {"LMFusion (deep, text frozen)": "configs/llama3_8b_lmfusion.py",
           "dense baseline (all trained)": "configs/llama3_8b_dense.py"}
REPO = pathlib.Path(__file__).resolve().parent.parent
# What was tried on the LMFusion v5p-128 cell (name -> config overrides), printed as a second table.
LEVERS = {"attention_xla": ["--config.model.attention_impl=xla"],
          "remat_dots": ["--config.model.remat_policy=dots_saveable"]}
LEVER_TOPOLOGY = "v5p-128"
HEADER = ("256 sequences x 4096 tokens per step (3072 text slots + 4 images x 256 tokens), bf16 compute, fp32 "
          "parameters, FSDP over the slice, the config defaults (flash attention, full remat). HBM from the "
          "run's own (scanned) compile; FLOPs and step time from unrolled 2- and 3-layer compiles extrapolated "
          "per layer, built with windowed einsums off (the compiler's cost analysis counts any loop body once, "
          "and at 8 rows per chip the SPMD partitioner turns FSDP matmuls into windowed-einsum loops); MFU = "
          "model FLOPs / (estimated step time x 459 TFLOP/s x chips). `6ND+attn` counts 6 x active parameters "
          "per token + attention (12 x S^2 x heads x head_dim per layer and row); `required` counts what the "
          "step must compute (frozen text weights get no weight gradient: 4x instead of 6x).")


def plan_one(config: str, topology: str, cost: str, overrides: list, out_file: pathlib.Path) -> dict:
  if out_file.exists():
    return json.loads(out_file.read_text())
  preset = f"{config}:{topology}"
  cmd = [sys.executable, "-m", "lmfusion_jax.cli", "plan", "--config", preset, "--topology", topology,
         "--cost", cost, "--json", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  err_tail = []
  for line in proc.stderr:          # progress lines through, the rest kept for an error message
    if line.startswith("plan:"):
      print(f"# {out_file.stem}: {line.rstrip()}", file=sys.stderr, flush=True)
    err_tail = (err_tail + [line])[-60:]
  stdout = proc.stdout.read()
  proc.wait()
  if proc.returncode not in (0, 1) or not stdout.strip():
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(err_tail)[-3000:]}")
  result = json.loads(stdout.strip().splitlines()[-1])
  result["plan_wall_s"] = time.time() - t0
  tmp = out_file.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, sort_keys=True))
  tmp.rename(out_file)
  return result


def _f(x, fmt):
  return "n/a" if x is None else format(x, fmt)


def checked(r: dict) -> dict:
  """Applies cost.cost_inconsistency to a result (also to results cached before the check existed)."""
  from lmfusion_jax.planning.cost import cost_inconsistency
  warning = r.get("cost_warning") or cost_inconsistency(r["compiled_flops_per_step"], r["model_flops"]["required"])
  if warning:
    r = {**r, "cost_warning": warning, "step_time_s": None, "tokens_per_s": None, "mfu_6nd_attn": None,
         "mfu_required": None}
  return r


def table(rows) -> str:
  head = ("| model | slice | chips | HBM need / chip | fits | compiled FLOPs/step | 6ND+attn FLOPs/step | "
          "est. step time | tokens/s/chip | MFU (6ND+attn) | MFU (required FLOPs) |")
  lines = [head, "|" + "|".join(["---"] * 11) + "|"]
  notes = []
  for name, r in rows:
    r = checked(r)
    if r.get("cost_warning"):
      notes.append(f"- {name} on {r['topology']}: {r['cost_warning']}")
    mf = r["model_flops"]
    lines.append(
        f"| {name} | {r['topology']} | {r['chips']} | {r['hbm_need_bytes'] / 2**30:.1f} / "
        f"{r['hbm_capacity_bytes'] / 2**30:.0f} GiB | {'yes' if r['fits'] else 'NO'} | "
        f"{_f(r['compiled_flops_per_step'], '.3e')} | {mf['six_nd_attn']:.3e} | "
        f"{_f(r['step_time_s'], '.2f')}{' s' if r['step_time_s'] else ''} | "
        f"{_f(r['tokens_per_s'] and r['tokens_per_s'] / r['chips'], ',.0f')} | "
        f"{_f(r['mfu_6nd_attn'], '.1%')} | {_f(r['mfu_required'], '.1%')} |")
  return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topologies", nargs="+", default=["v5p-64", "v5p-128", "v5p-256"])
  p.add_argument("--configs", nargs="+", default=list(CONFIGS.values()))
  p.add_argument("--cost", default="scaled", choices=("scaled", "unrolled"))
  p.add_argument("--out", default=str(REPO / "benchmarks" / "plan_results"))
  p.add_argument("--variant", default="", help="a name for the overrides that follow (kept apart in --out)")
  p.add_argument("--no-levers", action="store_true",
                 help=f"skip the lever table (LMFusion on {LEVER_TOPOLOGY} with each of {sorted(LEVERS)})")
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad}")
  if overrides and not args.variant:
    p.error("config overrides need --variant NAME (results are cached per variant)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = {v: k for k, v in CONFIGS.items()}
  print(HEADER + "\n")
  rows = []
  for config in args.configs:
    for topo in args.topologies:
      stem = f"{pathlib.Path(config).stem}__{topo}__{args.cost}" + (f"__{args.variant}" if args.variant else "")
      r = plan_one(config, topo, args.cost, overrides, out / f"{stem}.json")
      print(f"# {config} on {topo}: done ({r.get('plan_wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
      rows.append((names.get(config, config) + (f" [{args.variant}]" if args.variant else ""), r))
  print(table(rows))
  if args.variant or args.no_levers:
    return 0
  lmfusion = CONFIGS["LMFusion (deep, text frozen)"]
  base = [r for (n, r) in rows if n.startswith("LMFusion") and r["topology"] == LEVER_TOPOLOGY]
  lever_rows = [("config default (flash attention, full remat)", base[0])] if base else []
  for name, lever_overrides in LEVERS.items():
    stem = f"{pathlib.Path(lmfusion).stem}__{LEVER_TOPOLOGY}__{args.cost}__{name}"
    r = plan_one(lmfusion, LEVER_TOPOLOGY, args.cost, lever_overrides, out / f"{stem}.json")
    lever_rows.append((f"{name}: {' '.join(lever_overrides)}", r))
  print(f"\nLevers, LMFusion on {LEVER_TOPOLOGY} (one change each against the config default):\n")
  print(table(lever_rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
