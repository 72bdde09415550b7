"""Regenerates BENCHMARKS.md: runs each benchmark script and replaces its section in place.

  python benchmarks/run.py                       # everything except the slow ones
  python benchmarks/run.py --all                 # also conversion memory (~1B model) and the TPU plan table
  python benchmarks/run.py --only routing,sampling

Sections are delimited by <!-- BEGIN name --> / <!-- END name --> markers, so a partial run keeps the
others. Each section records the command, the machine and the date next to the figures.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "BENCHMARKS.md"

# name -> (title, command, slow)
BENCHMARKS = {
    "routing": ("Routed vs both-branches forward FLOPs", "python benchmarks/routing_flops.py", False),
    "train_flops": ("Frozen vs trainable text: train-step FLOPs and optimizer bytes",
                    "python benchmarks/train_step_flops.py", False),
    "text_train_step": ("CPU train step: our text model vs HF torch Llama", "python benchmarks/text_train_step.py",
                        False),
    "forward": ("CPU forward throughput: our text model vs HF torch Llama",
                "python benchmarks/forward_throughput.py", False),
    "sampling": ("Image sampling: cached caption prefix vs recomputing it", "python benchmarks/sampling_cache.py",
                 False),
    "attention": ("One layer's attention on a v5p chip: XLA reference vs the Pallas flash kernel (AOT compile)",
                  "python benchmarks/attention_kernel.py", False),
    "data": ("Data pipeline throughput and padding", "python benchmarks/data_throughput.py --batches 100", False),
    "convert_memory": ("Conversion peak memory (random ~1.2B Llama, bf16)", "python benchmarks/convert_memory.py",
                       True),
    "prepare_cost": ("Preparing image data: prepare-data on this CPU, the SD-VAE encoder on v5p, 380M images",
                     "python benchmarks/prepare_data_cost.py", True),
    "ablations": ("Ablations at small scale (the paper's Table 4 claims, digits data)",
                  "python benchmarks/ablations.py", True),
    "plan": ("TPU plan: Llama-3-8B LMFusion vs dense baseline (AOT compile, libtpu cost model)",
             "python benchmarks/plan_table.py", True),
}


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    model = cpu
  return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run_one(name: str) -> str:
  title, cmd, _ = BENCHMARKS[name]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=str(ROOT))
  r = subprocess.run(cmd.split(), cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode != 0:
    raise SystemExit(f"benchmark {name!r} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
  body = "\n".join(l for l in r.stdout.splitlines() if not l.startswith("WARNING"))
  stamp = datetime.date.today().isoformat()
  return (f"<!-- BEGIN {name} -->\n## {title}\n\nCommand: `{cmd}` — machine: {machine()} — {stamp}\n\n"
          f"{body.strip()}\n<!-- END {name} -->")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--all", action="store_true", help="include the slow benchmarks")
  ap.add_argument("--only", default="", help="comma-separated section names: " + ",".join(BENCHMARKS))
  a = ap.parse_args()
  names = [n for n in (a.only.split(",") if a.only else BENCHMARKS) if n]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise SystemExit(f"unknown benchmark(s) {unknown}; have {list(BENCHMARKS)}")
  if not a.only and not a.all:
    names = [n for n in names if not BENCHMARKS[n][2]]
  text = OUT.read_text() if OUT.exists() else "# Benchmarks\n"
  for name in names:
    print(f"running {name} ...", flush=True)
    section = run_one(name)
    pattern = re.compile(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
  tmp = OUT.with_suffix(".md.tmp")
  tmp.write_text(text)
  tmp.replace(OUT)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
