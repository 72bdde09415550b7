"""The `plan` table: Llama-3-8B LMFusion vs the dense (Transfusion-style) baseline on v5p-64/128/256, the text-only
reference and LLaVAFusion (LLaVA-NeXT-8B).

  python benchmarks/plan_table.py [--cost scaled|unrolled] [--out DIR] [--topologies v5p-64 v5p-128 ...]
                                  [--variant NAME --config.k=v ...]

Each cell is one `lmfusion-jax plan --json` run in its own process: three 8B compiles (the scanned step
for memory, 2 and 3 unrolled layers for cost), ~20-30 minutes and ~6 GB RAM on a 2-core host; the
planner's progress lines are passed through to stderr. Results are kept as JSON under --out, so an interrupted
table resumes where it stopped; `--variant NAME --config.k=v ...` plans a variant (e.g. another remat
policy or mesh) with those overrides applied to every config. Needs libtpu (`pip install '.[tpu]'`).
Prints a markdown table: HBM need per chip, compiled FLOPs per step, the compiler's step-time estimate,
tokens/s per chip and the MFU estimates (required FLOPs, MaxText's convention) and HFU. Cached results get
their FLOP conventions recomputed (`refresh`) from their cached step time.
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
           "dense baseline (all trained)": "configs/llama3_8b_dense.py",
           "text-only Llama-3-8B (all trained)": "configs/llama3_8b_text.py",
           "LLaVAFusion (LLaVA-NeXT-8B frozen)": "configs/llava_next_8b_fusion.py"}
REPO = pathlib.Path(__file__).resolve().parent.parent
# What was tried on the LMFusion v5p-128 cell (name -> config overrides), printed as a second table.
# The v5p-128 preset saves matmul outputs (dots_saveable); the levers are compiled with full remat, the other
# presets' policy, so "remat_full" is the remat lever and "attention_xla" the attention one against it.
LEVERS = {"remat_full": ["--config.model.remat_policy=full"],
          "attention_xla": ["--config.model.attention_impl=xla", "--config.model.remat_policy=full"]}
LEVER_TOPOLOGY = "v5p-128"
HEADER = ("256 sequences x 4096 tokens per step (LMFusion / dense: 3072 text slots + 4 images x 256 tokens; "
          "text-only: 4096 text tokens), bf16 compute, fp32 parameters, FSDP over the slice, the config defaults "
          "(flash attention; full remat, except LMFusion's v5p-128 preset: dots_saveable). Every figure is the "
          "TPU compiler's estimate on a CPU host (libtpu 0.0.42 cost model), not a TPU measurement. HBM from the "
          "run's own (scanned) compile; FLOPs and step time from unrolled 2- and 3-layer compiles extrapolated per "
          "layer, built with windowed einsums off. MFU = "
          "model FLOPs / (estimated step time x 459 TFLOP/s x chips): `required` counts what the step must compute "
          "(frozen weights 4x, trained 6x, causal attention), `MaxText` is MaxText's "
          "calculate_tflops_training_per_device (every token a trained dense-Llama token, causal attention); "
          "`HFU` uses the compiled FLOPs. The reference trainer (MaxText, Llama-3-8B text only, same tokens per "
          "chip, full remat, splash attention, same libtpu; measured when issue 16 was filed, MaxText is not "
          "installed here) is estimated at 2.779 s per step and 18.72 GiB per chip on v5p-128.")


def refresh(r: dict, config: str, overrides: list) -> dict:
  """A cached result's model FLOPs and MFU figures recomputed with today's conventions (planning.flops) from its
  cached step time: the compiler's estimate does not depend on how the FLOPs are counted afterwards."""
  from lmfusion_jax.planning import flops as flops_lib
  from lmfusion_jax.run_config import apply_overrides, load_config, model_configs
  from lmfusion_jax.training import optimizer as optim
  cfg = apply_overrides(load_config(f"{config}:{r['topology']}"), overrides)
  lcfg, fcfg, _ = model_configs(cfg)
  io = flops_lib.image_io_flops_per_image(lcfg, fcfg) if cfg.data.image_slots else 0.0
  mf = flops_lib.model_flops(lcfg, fcfg, cfg.data, "text" in optim.trainable_branches(cfg.optim), io)
  step, peak, chips = r.get("step_time_s"), r.get("peak_flops_per_chip"), r["chips"]
  util = lambda f: f / (step * peak * chips) if (step and peak and f is not None) else None  # noqa: E731
  return {**r, "model_flops": mf, "mfu_maxtext": util(mf["maxtext"]), "mfu_required": util(mf["required"]),
          "hfu": util(r.get("compiled_flops_per_step"))}


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
    r = {**r, "cost_warning": warning, "step_time_s": None, "tokens_per_s": None, "mfu_maxtext": None,
         "mfu_required": None, "hfu": None}
  return r


def table(rows) -> str:
  head = ("| model | slice | chips | HBM need / chip | fits | est. step time | tokens/s/chip | MFU (required) | "
          "MFU (MaxText) | HFU | compiled FLOPs/step | required FLOPs/step |")
  lines = [head, "|" + "|".join(["---"] * 12) + "|"]
  notes = []
  for name, r in rows:
    r = checked(r)
    if r.get("cost_warning"):
      notes.append(f"- {name} on {r['topology']}: {r['cost_warning']}")
    mf = r["model_flops"]
    lines.append(
        f"| {name} | {r['topology']} | {r['chips']} | {r['hbm_need_bytes'] / 2**30:.1f} / "
        f"{r['hbm_capacity_bytes'] / 2**30:.0f} GiB | {'yes' if r['fits'] else 'NO'} | "
        f"{_f(r['step_time_s'], '.3f')}{' s' if r['step_time_s'] else ''} | "
        f"{_f(r['tokens_per_s'] and r['tokens_per_s'] / r['chips'], ',.0f')} | "
        f"{_f(r['mfu_required'], '.1%')} | {_f(r['mfu_maxtext'], '.1%')} | {_f(r['hfu'], '.1%')} | "
        f"{_f(r['compiled_flops_per_step'], '.3e')} | {mf['required']:.3e} |")
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
      r = refresh(plan_one(config, topo, args.cost, overrides, out / f"{stem}.json"), config, overrides)
      print(f"# {config} on {topo}: done ({r.get('plan_wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
      rows.append((names.get(config, config) + (f" [{args.variant}]" if args.variant else ""), r))
  print(table(rows))
  if args.variant or args.no_levers:
    return 0
  lmfusion = CONFIGS["LMFusion (deep, text frozen)"]
  base = [r for (n, r) in rows if n.startswith("LMFusion") and r["topology"] == LEVER_TOPOLOGY]
  lever_rows = [("config default (flash attention, dots_saveable remat)", base[0])] if base else []
  for name, lever_overrides in LEVERS.items():
    stem = f"{pathlib.Path(lmfusion).stem}__{LEVER_TOPOLOGY}__{args.cost}__{name}"
    r = refresh(plan_one(lmfusion, LEVER_TOPOLOGY, args.cost, lever_overrides, out / f"{stem}.json"), lmfusion,
                lever_overrides)
    lever_rows.append((f"{name}: {' '.join(lever_overrides)}", r))
  print(f"\nLevers, LMFusion on {LEVER_TOPOLOGY} (the config default, full remat instead, and the XLA attention "
        f"with full remat):\n")
  print(table(lever_rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
