"""The paper's ablation table at small scale, on the embedded digits data or real MNIST (CPU, one command).

  python benchmarks/ablations.py [--workdir /tmp/lmfusion-ablations] [--seeds 0,1,2] [--steps 2000]
                                 [--variants lmfusion,shallow,...] [--config configs/demo_digits.py]
                                 [--lm-size small|large]
  python benchmarks/ablations.py --config configs/demo_mnist.py --lm-size large \
      --variants lmfusion,random_init,transfusion      # -> /tmp/lmfusion-ablations-demo_mnist-large
  python benchmarks/ablations.py --config configs/demo_mnist.py:px8 ...   # -> /tmp/lmfusion-ablations-demo_mnist_px8-small

--lm-size: the stand-in text LM (and so the image modules copied from it): `small` is the config's (the
demos': 2 layers, 64 wide); `large` is 4x deeper and 4x wider (8 layers, 256 wide, 16 heads of 16, FFN
1024), pretrained with the same recipe at text_lr 1e-3. Without --workdir, runs other than the default
(digits config, small LM) go to their own folder, /tmp/lmfusion-ablations-<config>[_<arg>]-<size>.

Every variant starts from the same pretrained tiny text LM (the demo's: same data, tokenizer and LM
recipe, pretrained once with seed 0) and trains on the config's image-caption data with the same number of
steps x rows (the same token budget) for each seed; only Transfusion-style training starts from scratch
and gets the same FLOPs as LMFusion's whole recipe (text pretraining + LMFusion training) instead:

  lmfusion        deep separation, eta_text = 0 (LMFusion)
  shallow         shallow separation (modality-specific FFN only), eta_text = 0
  dense_frozen    no separation (image tokens use the text weights), eta_text = 0
  dense_ft        no separation, eta_text / eta_image = 1 (plain fine-tuning)
  dense_ft_0.1    no separation, eta_text / eta_image = 0.1
  random_init     deep separation, image modules randomly initialized instead of copied, eta_text = 0
  transfusion     the dense model trained from scratch on the same data, all weights at eta_image

Per run: captioning accuracy and generation accuracy (the eval's independent classifier fitted on real
training images), mean diffusion validation loss at fixed t, and the held-out text NLL minus the base LM's.
Each run's metrics are written to WORKDIR/<variant>/seed<k>/result.json and reused on the next call, so an
interrupted benchmark resumes. Prints the markdown section for BENCHMARKS.md (benchmarks/run.py --only
ablations puts it there), including a reading of the paper's claims computed from the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (description, config overrides); text_lr is given as a ratio of image_lr ("x<r>")
VARIANTS = {
    "lmfusion": ("deep separation, eta_text=0 (LMFusion)", {"fusion.separation": "deep", "text_lr": "x0"}),
    "shallow": ("shallow separation (FFN only), eta_text=0", {"fusion.separation": "shallow", "text_lr": "x0"}),
    "dense_frozen": ("no separation, eta_text=0", {"fusion.separation": "none", "text_lr": "x0"}),
    "dense_ft": ("no separation, eta_text/eta_image=1", {"fusion.separation": "none", "text_lr": "x1"}),
    "dense_ft_0.1": ("no separation, eta_text/eta_image=0.1", {"fusion.separation": "none", "text_lr": "x0.1"}),
    "random_init": ("deep separation, random image modules, eta_text=0",
                    {"fusion.separation": "deep", "fusion.image_init": "random", "text_lr": "x0"}),
    "transfusion": ("Transfusion-style: dense, from scratch, same FLOPs", {"fusion.separation": "none",
                                                                          "text_lr": "x1"}),
}
# --lm-size large: config overrides of the stand-in text LM (4x the demo's depth and width)
LM_SIZES = {"small": {}, "large": {"model.dim": 256, "model.n_layers": 8, "model.n_heads": 16,
                                   "model.n_kv_heads": 8, "model.head_dim": 16, "model.ffn_dim": 1024,
                                   "demo.text_lr": 1e-3}}
METRICS = ("caption_accuracy", "generation_accuracy", "diffusion_loss_mean", "text_nll_delta")


def log(msg):
  print(f"[ablations] {msg}", file=sys.stderr, flush=True)


def base_setup(cfg, workdir: pathlib.Path, mesh) -> dict:
  """Dataset, tokenizer and the pretrained base LM (the demo's stages; each reused when present)."""
  from etils import epath
  from lmfusion_jax import demo
  from lmfusion_jax.evaluation.evaluate import evaluate_text_nll
  wd = epath.Path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  data_dir, tok_dir, tokenizer = demo.prepare_data(cfg, wd)
  cfg.data.data_dir, cfg.data.tokenizer_dir = data_dir, tok_dir
  base_lm = demo.pretrain_base_lm(cfg, wd, tokenizer, mesh)
  converted = demo.export_and_convert(cfg, wd, base_lm, tokenizer)
  nll_file = workdir / "base_text_nll.json"
  if not nll_file.exists():
    nll_file.write_text(json.dumps(evaluate_text_nll(converted, cfg)))
  return {"base_lm": base_lm, "base_text_nll": json.loads(nll_file.read_text())["text_nll"]}


def pretrain_flops(cfg) -> float:
  """Analytic FLOPs of the demo's text LM pretraining (its rows carry no images)."""
  from lmfusion_jax.planning import flops
  from lmfusion_jax.run_config import model_configs
  lcfg, fcfg, _ = model_configs(cfg)
  per_step = flops.train_step_flops(lcfg, fcfg, int(cfg.demo.text_batch), int(cfg.demo.text_seq_len), 0,
                                    text_trainable=True)["total"]
  return per_step * int(cfg.demo.text_steps)


def step_flops(cfg, text_trainable: bool) -> float:
  from lmfusion_jax.planning import flops
  from lmfusion_jax.run_config import model_configs
  lcfg, fcfg, _ = model_configs(cfg)
  return flops.train_step_flops(lcfg, fcfg, int(cfg.data.global_batch_size), int(cfg.data.text_len),
                                int(cfg.data.image_slots), text_trainable)["total"]


def run_config(base_cfg, variant: str, seed: int, steps: int, workdir: pathlib.Path, base: dict):
  """The training config of one (variant, seed) run."""
  cfg = base_cfg.copy_and_resolve_references()
  overrides = dict(VARIANTS[variant][1])
  ratio = float(overrides.pop("text_lr")[1:])
  for key, value in overrides.items():  # typed values set directly ("none" is a string, not None)
    section, field = key.split(".")
    cfg[section][field] = value
  cfg.seed = seed
  cfg.workdir = str(workdir)
  cfg.tensorboard = False
  cfg.total_steps = steps
  cfg.save_every = steps
  cfg.log_every = max(1, steps // 4)
  cfg.optim.text_lr = ratio * cfg.optim.image_lr
  cfg.optim.text_final_lr = ratio * cfg.optim.image_final_lr
  if variant == "transfusion":
    # same FLOPs as LMFusion's whole recipe: its text pretraining + its (frozen-text) training steps
    lmf = base_cfg.copy_and_resolve_references()
    budget = pretrain_flops(lmf) + steps * step_flops(lmf, text_trainable=False)
    cfg.total_steps = int(round(budget / step_flops(cfg, text_trainable=True)))
    cfg.save_every = cfg.total_steps
    cfg.log_every = max(1, cfg.total_steps // 4)
    cfg.init_from = ""
  else:
    # text-only base LM: every variant builds its image branch from the same text weights with its seed
    cfg.init_from = base["base_lm"]
  return cfg


def run_one(base_cfg, variant: str, seed: int, steps: int, workdir: pathlib.Path, base: dict) -> dict:
  from lmfusion_jax.evaluation.evaluate import evaluate
  from lmfusion_jax.training.loop import train
  out = workdir / variant / f"seed{seed}"
  result_file = out / "result.json"
  if result_file.exists():
    return json.loads(result_file.read_text())
  cfg = run_config(base_cfg, variant, seed, steps, out / "run", base)
  log(f"{variant} seed {seed}: {cfg.total_steps} steps")
  t0 = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the markdown section
    train(cfg)
    t_train = time.perf_counter() - t0
    m = evaluate(str(out / "run"), cfg)
  result = {k: m[k] for k in METRICS[:3]}
  result.update(text_nll=m["text_nll"], text_nll_delta=m["text_nll"] - base["base_text_nll"],
                text_nll_bitwise_unchanged=bool(np.float64(m["text_nll"]) == np.float64(base["base_text_nll"])),
                steps=cfg.total_steps, train_seconds=t_train, eval_seconds=time.perf_counter() - t0 - t_train)
  tmp = out / "result.json.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(result_file)
  log(f"{variant} seed {seed}: " + ", ".join(f"{k} {result[k]:.4g}" for k in METRICS))
  return result


def summarize(results: dict) -> dict:
  """variant -> metric -> (mean, sample std over seeds)."""
  def stats(xs):
    xs = np.asarray(xs, np.float64)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
  return {v: {k: stats([r[k] for r in rs]) for k in METRICS} for v, rs in results.items()}


# smallest difference that counts, whatever the seed spread (accuracies are over a few hundred images)
FLOOR = {"caption_accuracy": 0.02, "generation_accuracy": 0.02, "diffusion_loss_mean": 0.002,
         "text_nll_delta": 1e-6}


def better(s, results, a: str, b: str, metric: str, higher: bool = True) -> bool:
  """a beats b on metric: the mean difference exceeds twice its standard error over seeds and FLOOR."""
  (ma, sa), (mb, sb) = s[a][metric], s[b][metric]
  se = np.sqrt(sa ** 2 / len(results[a]) + sb ** 2 / len(results[b]))
  diff = (ma - mb) if higher else (mb - ma)
  return bool(diff > max(2 * se, FLOOR[metric]))


def reading(s: dict, results: dict) -> list:
  """The paper's claims, each marked holds / does not hold from the measured means and spreads."""
  lines = []

  def claim(text, holds, detail):
    lines.append(f"- {'HOLDS' if holds else 'DOES NOT HOLD'}: {text} ({detail})")

  def fmt(k, vs):
    short = {"caption_accuracy": "captioning", "generation_accuracy": "generation",
             "diffusion_loss_mean": "diffusion loss", "text_nll_delta": "text NLL change"}[k]
    return f"{short}: " + " vs ".join(f"{v} {s[v][k][0]:.3f}±{s[v][k][1]:.3f}" for v in vs)

  have = lambda *vs: all(v in s for v in vs)
  ks = (("caption_accuracy", True), ("generation_accuracy", True), ("diffusion_loss_mean", False))
  for a, b in (("lmfusion", "shallow"), ("shallow", "dense_frozen"), ("lmfusion", "dense_frozen")):
    if have(a, b):
      wins = [k for k, hi in ks if better(s, results, a, b, k, hi)]
      losses = [k for k, hi in ks if better(s, results, b, a, k, hi)]
      claim(f"with frozen text, {a} beats {b} (wins on: {', '.join(wins) or 'none'}; "
            f"loses on: {', '.join(losses) or 'none'})", bool(wins) and not losses,
            "; ".join(fmt(k, (a, b)) for k, _ in ks))
  if have("dense_ft", "dense_ft_0.1"):
    k = "text_nll_delta"
    claim("dense fine-tuning degrades text (held-out text NLL rises with eta_text > 0)",
          s["dense_ft"][k][0] > max(2 * s["dense_ft"][k][1], FLOOR[k]) and
          s["dense_ft_0.1"][k][0] > max(2 * s["dense_ft_0.1"][k][1], FLOOR[k]),
          fmt(k, ("dense_ft", "dense_ft_0.1")))
  frozen = [v for v in ("lmfusion", "shallow", "dense_frozen", "random_init") if v in results]
  if frozen:
    n_exact = sum(r["text_nll_bitwise_unchanged"] for v in frozen for r in results[v])
    n_all = sum(len(results[v]) for v in frozen)
    claim("freezing the text weights preserves text exactly", n_exact == n_all,
          f"held-out text NLL bitwise equal to the base LM's in {n_exact}/{n_all} frozen-text runs")
  if have("lmfusion", "random_init"):
    claim("copying the text weights into the image modules gives a head start over random init",
          any(better(s, results, "lmfusion", "random_init", k, hi) for k, hi in ks),
          "; ".join(fmt(k, ("lmfusion", "random_init")) for k, _ in ks))
  if have("lmfusion", "transfusion"):
    claim("LMFusion beats Transfusion-style training from scratch at the same FLOPs (on some image metric, "
          "while keeping text exact)", any(better(s, results, "lmfusion", "transfusion", k, hi) for k, hi in ks),
          "; ".join(fmt(k, ("lmfusion", "transfusion")) for k, _ in ks + (("text_nll_delta", False),)))
  return lines


def lm_shape(cfg) -> str:
  m = cfg.model
  return f"{m.n_layers} layers x {m.dim} wide, FFN {m.ffn_dim}, {cfg.demo.text_steps} pretraining steps"


def variant_flags(args) -> str:
  out = f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else ""
  if os.path.relpath(args.config, ROOT) != os.path.join("configs", "demo_digits.py"):
    out += f" --config {os.path.relpath(args.config, ROOT)}"
  return out + (f" --lm-size {args.lm_size}" if args.lm_size != "small" else "")


def markdown(s: dict, results: dict, args, setup_s: float, total_s: float) -> str:
  rows = ["| variant | steps | captioning acc | generation acc | diffusion val loss | text NLL - base |",
          "|---|---|---|---|---|---|"]
  for v in s:
    cells = [f"{s[v][k][0]:.3f} ± {s[v][k][1]:.3f}" for k in METRICS]
    rows.append(f"| {v}: {VARIANTS[v][0]} | {results[v][0]['steps']} | " + " | ".join(cells) + " |")
  seeds = sorted({int(k) for k in args.seeds.split(",")})
  run_min = sum(r["train_seconds"] + r["eval_seconds"] for rs in results.values() for r in rs) / 60
  cfg_name = os.path.relpath(args.config, ROOT)
  data = "MNIST" if "mnist" in cfg_name else "digits"
  head = [f"`python benchmarks/ablations.py --steps {args.steps} --seeds {args.seeds}{variant_flags(args)}` on the "
          f"{data} data (config `{cfg_name}`, stand-in text LM `{args.lm_size}`: {lm_shape(args.cfg)}); mean ± std over seeds {seeds}; every run starts from the same "
          f"pretrained text LM except `transfusion` (from scratch, steps chosen to match the FLOPs of text "
          f"pretraining + LMFusion training). The {sum(len(r) for r in results.values())} runs took {run_min:.1f} min "
          f"of training + evaluation (sum of their wall times, recorded in each result.json); this invocation "
          f"{total_s / 60:.1f} min, setup {setup_s:.0f} s (finished runs and the base LM are reused).", ""]
  return "\n".join(head + rows + ["", "Reading (computed from the numbers above: a difference counts when it "
                                      "exceeds twice its standard error over seeds and a small floor):", ""]
                   + reading(s, results))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="", help="default /tmp/lmfusion-ablations (digits config, small LM), "
                                                  "else /tmp/lmfusion-ablations-<config>[_<arg>]-<lm size>")
  ap.add_argument("--lm-size", choices=tuple(LM_SIZES), default="small",
                  help="stand-in text LM: small (the config's) or large (4x deeper and wider)")
  ap.add_argument("--config", default=str(ROOT / "configs" / "demo_digits.py"))
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--steps", type=int, default=2000, help="LMFusion training steps per run (same for all but "
                                                          "transfusion, which is FLOP-matched)")
  ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
  ap.add_argument("--eval-examples", type=int, default=200)
  ap.add_argument("--samples-per-class", type=int, default=10)
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from lmfusion_jax import sharding
  from lmfusion_jax.run_config import load_config
  variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variant(s) {unknown}; have {list(VARIANTS)}")
  seeds = [int(x) for x in args.seeds.split(",")]
  t0 = time.perf_counter()
  cfg = load_config(args.config)
  for key, value in LM_SIZES[args.lm_size].items():
    section, field = key.split(".")
    cfg[section][field] = value
  args.cfg = cfg
  if not args.workdir:
    path, _, variant = args.config.partition(":")
    stem = pathlib.Path(path).stem + (f"_{variant}" if variant else "")
    plain = stem == "demo_digits" and args.lm_size == "small"
    args.workdir = "/tmp/lmfusion-ablations" + ("" if plain else f"-{stem}-{args.lm_size}")
  cfg.eval.num_examples = args.eval_examples
  cfg.eval.samples_per_class = args.samples_per_class
  workdir = pathlib.Path(args.workdir)
  base = base_setup(cfg, workdir, sharding.mesh_from_config(cfg.mesh))
  setup_s = time.perf_counter() - t0
  results = {v: [run_one(cfg, v, seed, args.steps, workdir, base) for seed in seeds] for v in variants}
  s = summarize(results)
  print(markdown(s, results, args, setup_s, time.perf_counter() - t0))


if __name__ == "__main__":
  main()
