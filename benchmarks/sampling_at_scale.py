"""Cost of text-to-image sampling at scale: measured images/s on this CPU (tiny model) and the TPU compiler's
estimate for Llama-3-8B LMFusion on a v5p slice, turned into the time of a COCO-sized job.

  python benchmarks/sampling_at_scale.py                  # both parts (20-40 minutes on 2 CPU cores)
  python benchmarks/sampling_at_scale.py --skip-tpu       # part (a) only (under a minute)
  python benchmarks/sampling_at_scale.py --skip-cpu --prompts-per-chip 8 --param-rule conv_out=none
  python benchmarks/sampling_at_scale.py --skip-cpu --prompts-per-chip 8 --config.mesh.data=64 --config.mesh.fsdp=1

(a) CPU, measured. `inference.image.generate_images` (the real sampling path: caption prefix `BOS caption
BOI` prefilled once into a KV cache, then every denoising step runs the image tokens only against it; with
classifier-free guidance the conditional and unconditional rows run as one batch) on randomly initialized
models at the paper's sampling settings (the run config's `sampling`: DDPM, CFG 1.55) with --cpu-steps
denoising steps. Wall time of one call (prefill + every step + the result on the host) is the median of
--repeats calls after a warm-up call (compilation); images/s per device = prompts / that time (this host
has one JAX CPU device using both cores).

(b) TPU, the compiler's estimate. The REAL sampling programs of --config (default: Llama-3-8B text + deep
image branch, U-Net io, 256x256 images -> 32x32x4 latents -> 256 tokens per image) compiled ahead of time
for --topology (default v5p-128 = 64 chips) on this CPU host with libtpu compile-only devices
(lmfusion_jax/planning/sampling.py; nothing runs on a TPU):
  denoise   `inference.sampler._denoise` (what `generate_images` / `Sampler.denoise` run): one DDPM step,
            guided, over 2 x prompts rows (conditional + unconditional) against a cached prefix of --prefix slots.
  prefill   `inference.sampler._prefill_text`: the prefixes through the text tower into the cache, once per
            batch of prompts.
Parameters are placed by the logical-axis rule table (lmfusion_jax/sharding.py; --param-rule changes it) over
the config's mesh for the topology, as training places them; for the 8B presets (FSDP over the slice) that is
also `inference.loading.load_model`'s default placement (fp32 parameters, bf16 compute). Rows and the cache
are split over data x fsdp. Memory (per chip) comes from the
compile of the whole --steps-step chain with the model as configured (scanned layers); FLOPs and the time
estimate ("optimal_seconds" of cost_analysis) from a compile of the program with every layer unrolled (a
scanned layer is counted once), windowed einsums off, as `lmfusion-jax plan` reads the train step
(planning/cost.py); --cost scaled uses 2- and 3-layer compiles extrapolated per layer instead, and
--check-scaled does both for some batch sizes (a check of the extrapolation, and the per-layer breakdown).
The job time is
  ceil(prompts / prompts per batch) x (prefill + steps x denoising step),
with the cost model's estimates and no host overhead (tokenizing, VAE decoding, writing images not counted).

Prints the markdown tables of the BENCHMARKS.md section "Sampling at scale"; needs libtpu for (b)
(`pip install '.[tpu]'` or the test extra).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # run from anywhere without installing the package
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

GIB = 2 ** 30


def machine() -> str:
  try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.processor() or platform.machine()
  return (f"{model}, {os.cpu_count()} cores (nproc), {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, jax {jax.__version__}")


def log(msg: str) -> None:
  print(f"# {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ (a) CPU, measured


def cpu_model(name: str):
  """A randomly initialized LMFusion: `tiny` = configs/tiny.py's sizes, `small` = benchmarks/sampling_cache.py's.
  Zero-initialized leaves (the eps output layer) are made random so eps != 0."""
  from lmfusion_jax.models.config import FusionConfig, LlamaConfig
  from lmfusion_jax.models.fusion import LMFusion
  from lmfusion_jax.models import sharded
  from lmfusion_jax.run_config import load_config, model_configs
  if name == "tiny":
    lcfg, fcfg, _ = model_configs(load_config(str(REPO / "configs" / "tiny.py")))
    lcfg, fcfg = lcfg.replace(bos_id=1, eos_id=2), fcfg.replace(boi_id=3, eoi_id=4)
  elif name == "small":
    lcfg = LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_dim=768,
                       rope_theta=10000.0, max_seq_len=1024, bos_id=1, eos_id=2)
    fcfg = FusionConfig(latent_size=16, latent_channels=4, patch_size=2, unet_channels=(64, 128), unet_blocks=1,
                        unet_groups=8, time_embed_dim=128, boi_id=3, eoi_id=4)
  else:
    raise SystemExit(f"--cpu-models: unknown model {name!r} (tiny, small)")
  graphdef, _ = sharded.graphdef_and_abstract_state(lcfg, fcfg)
  state = jax.jit(lambda: nnx.state(LMFusion(lcfg, fcfg, rngs=nnx.Rngs(0))))()
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: a if jnp.any(a) else jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype),
                       state)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))
  return nnx.merge(graphdef, state), n_params


def cpu_part(args, sampling) -> list:
  from lmfusion_jax import diffusion
  from lmfusion_jax.inference import image as gi
  dcfg = diffusion.DiffusionConfig()
  rows = []
  for name in args.cpu_models:
    model, n_params = cpu_model(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, model.lcfg.vocab_size, args.cpu_caption).tolist() for _ in range(args.cpu_prompts)]
    for steps in args.cpu_steps:
      def call():
        return jax.block_until_ready(gi.generate_images(model, prompts, dcfg, num_steps=steps,
                                                        sampler=sampling["sampler"],
                                                        cfg_scale=sampling["cfg_scale"], seed=0))
      t0 = time.perf_counter()
      out = call()                                    # warm-up: compiles
      warm = time.perf_counter() - t0
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      finite = bool(np.isfinite(np.asarray(out)).all())
      log(f"cpu {name} {steps} steps: {t:.2f} s per call (runs {', '.join(f'{x:.2f}' for x in times)}; first call "
          f"with compilation {warm:.1f} s; latents finite: {finite})")
      rows.append(dict(model=name, params=n_params, caption=args.cpu_caption + 2,
                       image_tokens=model.fcfg.tokens_per_image, latent=f"{model.fcfg.latent_size}x"
                       f"{model.fcfg.latent_size}x{model.fcfg.latent_channels}", prompts=len(prompts),
                       rows=2 * len(prompts) if sampling["cfg_scale"] != 1.0 else len(prompts), steps=steps,
                       seconds=t, runs=times, images_per_s=len(prompts) / t, ms_per_step=1e3 * t / steps,
                       n_devices=len(jax.devices()), finite=finite))
  return rows


def cpu_table(rows, sampling) -> str:
  lines = [f"| model (random weights) | params | prefix / image tokens | prompts (rows with CFG) | "
           f"{sampling['sampler'].upper()} steps | s per call | images/s per device | ms per step |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} ({r['latent']} latents) | {r['params'] / 1e6:.2f}M | {r['caption']} / "
                 f"{r['image_tokens']} | {r['prompts']} ({r['rows']}) | {r['steps']} | {r['seconds']:.2f} | "
                 f"{r['images_per_s']:.2f} | {r['ms_per_step']:.1f} |")
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- (b) TPU, AOT estimate


def param_rules(overrides) -> dict | None:
  """--param-rule NAME=AXES (AXES: none, or mesh axes joined by ',') applied to lmfusion_jax.sharding's table."""
  if not overrides:
    return None
  from lmfusion_jax import sharding
  rules = dict(sharding.LOGICAL_RULES)
  for o in overrides:
    name, _, axes = o.partition("=")
    if name not in rules:
      raise SystemExit(f"--param-rule {o}: unknown logical axis {name!r} (known: {sorted(rules)})")
    axes = [a for a in axes.split(",") if a and a.lower() != "none"]
    bad = [a for a in axes if a not in sharding.MESH_AXES]
    if bad:
      raise SystemExit(f"--param-rule {o}: unknown mesh axes {bad} (known: {sharding.MESH_AXES})")
    rules[name] = None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))
  return rules


def tpu_part(args, cfg, sampling) -> list:
  from lmfusion_jax.planning import flops as flops_lib
  from lmfusion_jax.planning import sampling as ps
  from lmfusion_jax.planning import topology
  from lmfusion_jax.run_config import model_configs
  lcfg, fcfg, dcfg = model_configs(cfg)
  topo = topology.parse_topology(args.topology)
  devices = topology.topology_devices(topo)
  mesh = topology.make_plan_mesh(cfg.mesh, devices)
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  peak = flops_lib.peak_flops_per_device(devices[0].device_kind)
  io = flops_lib.image_io_flops_per_image(lcfg, fcfg)
  guided = sampling["cfg_scale"] != 1.0
  rules = param_rules(args.param_rule)
  results = []
  for ppc in args.prompts_per_chip:
    shape = ps.SamplingShape(prompts=ppc * split, prefix_len=args.prefix, guided=guided,
                             sampler=sampling["sampler"])
    tag = f"{ppc} prompts/chip"
    t0 = time.time()
    mem_compiled = ps.compile_lowered(
        ps.lower_denoise(lcfg, fcfg, dcfg, mesh, shape, num_steps=args.steps, cfg_scale=sampling["cfg_scale"],
                         rules=rules),
        mesh)
    mem = ps.memory(mem_compiled)
    mem_s = time.time() - t0
    del mem_compiled
    log(f"{tag}: the {args.steps}-step chain compiled ({lcfg.n_layers} layers, "
        f"{'scanned' if lcfg.scan_layers else 'unrolled'}): {mem_s:.0f} s, {mem['need'] / GIB:.2f} GiB per chip")

    def denoise(l):
      return ps.lower_denoise(l, fcfg, dcfg, mesh, shape, num_steps=1, cfg_scale=sampling["cfg_scale"], rules=rules)

    def prefill(l):
      return ps.lower_prefill(l, mesh, shape, rules)

    t0 = time.time()
    step = ps.program_cost(denoise, lcfg, mesh, args.cost, log, f"{tag}: denoising step")
    step_compile_s = time.time() - t0
    t0 = time.time()
    pre_mem = ps.memory(ps.compile_lowered(prefill(lcfg), mesh))
    pre = ps.program_cost(prefill, lcfg, mesh, args.cost, log, f"{tag}: prefill")
    pre_s = time.time() - t0
    check = None
    if args.cost == "unrolled" and ppc in args.check_scaled:
      sc = ps.program_cost(denoise, lcfg, mesh, "scaled", log, f"{tag}: denoising step, scaled check")
      check = dict(flops_slice=sc["flops"] * len(devices), seconds=sc["optimal_seconds"],
                   per_layer_seconds=sc["per_layer_seconds"],
                   two_layer_seconds=sc.get("two_layer", {}).get("optimal_seconds"))
    elif args.cost == "scaled":
      check = dict(flops_slice=step["flops"] * len(devices), seconds=step["optimal_seconds"],
                   per_layer_seconds=step["per_layer_seconds"],
                   two_layer_seconds=step.get("two_layer", {}).get("optimal_seconds"))
    step_analytic = ps.denoise_step_flops(lcfg, fcfg, shape.rows, shape.prefix_len, io)
    pre_analytic = ps.prefill_flops(lcfg, shape.rows, shape.prefix_len)
    results.append(dict(
        topology=topo.name, chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
        prompts_per_chip=ppc, prompts_per_batch=shape.prompts, rows=shape.rows, prefix=shape.prefix_len,
        image_tokens=fcfg.tokens_per_image, n_layers=lcfg.n_layers, steps=args.steps, peak=peak,
        hbm_capacity=topo.hbm_bytes, memory=mem, prefill_memory=pre_mem,
        step=dict(flops_slice=step["flops"] * len(devices), seconds=step["optimal_seconds"], source=step["source"],
                  windowed_einsum_loops=step["windowed_einsum_loops"], analytic=step_analytic, scaled=check),
        prefill=dict(flops_slice=pre["flops"] * len(devices), seconds=pre["optimal_seconds"], source=pre["source"],
                     windowed_einsum_loops=pre["windowed_einsum_loops"], analytic=pre_analytic),
        compile_seconds=dict(memory=mem_s, step_cost=step_compile_s, prefill=pre_s)))
    log(f"{tag}: done (compiles: chain {mem_s:.0f} s, step cost {step_compile_s:.0f} s, prefill {pre_s:.0f} s)")
  return results


def _t(s):
  return "n/a" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s")


def tpu_tables(results, args) -> str:
  out = []
  head = ("| program | prompts / chip (rows) | compiled FLOPs (slice) | analytic FLOPs | est. time | "
          "HBM need / chip | analytic FLOPs / (time x peak x chips) |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  notes = []
  for r in results:
    for key, name, mem in (("step", "denoising step (DDPM, CFG)", r["memory"]),
                           ("prefill", "prefix prefill (once per batch)", r["prefill_memory"])):
      s = r[key]
      util = (s["analytic"]["total"] / (s["seconds"] * r["peak"] * r["chips"])
              if s["seconds"] and r["peak"] else None)
      lines.append(f"| {name} | {r['prompts_per_chip']} ({r['rows'] // r['chips']}) | {s['flops_slice']:.3e} | "
                   f"{s['analytic']['total']:.3e} | {_t(s['seconds'])} | {mem['need'] / GIB:.2f} / "
                   f"{r['hbm_capacity'] / GIB:.0f} GiB | {'n/a' if util is None else f'{util:.1%}'} |")
      if s["windowed_einsum_loops"]:
        notes.append(f"- {name}, {r['prompts_per_chip']} prompts/chip: the cost compiles hold "
                     f"{s['windowed_einsum_loops']} windowed-einsum loop(s) (counted once): figures unreliable")
  for r in results:
    s, sc = r["step"], r["step"]["scaled"]
    if not (sc and sc["per_layer_seconds"] and sc["two_layer_seconds"] and r["peak"]):
      continue
    a, pl, n = s["analytic"], sc["per_layer_seconds"], r["n_layers"]
    layer_flops = (a["weights"] + a["attention"]) / n
    rest = sc["two_layer_seconds"] - 2 * pl     # the 2-layer program minus its 2 layers
    if s["source"].startswith("unrolled compile"):
      notes.append(f"- denoising step, {r['prompts_per_chip']} prompts/chip, check of the per-layer extrapolation "
                   f"(2- and 3-layer compiles, as `plan --cost scaled`): {sc['seconds'] * 1e3:.1f} ms "
                   f"({sc['seconds'] / s['seconds'] - 1:+.1%} against the all-layers compile), FLOPs "
                   f"{sc['flops_slice']:.4e} ({sc['flops_slice'] / s['flops_slice'] - 1:+.2%})")
    notes.append(f"- denoising step, {r['prompts_per_chip']} prompts/chip, where the time goes (from the 2- and "
                 f"3-layer compiles): one layer {pl * 1e3:.2f} ms ({layer_flops / (pl * r['peak'] * r['chips']):.1%} "
                 f"of peak for its analytic FLOPs), x {n} = {n * pl * 1e3:.1f} ms; outside the layers (U-Net "
                 f"in/out, the sampler update) {rest * 1e3:.1f} ms "
                 f"({a['image_io'] / (rest * r['peak'] * r['chips']):.1%} of peak for the U-Net's FLOPs)")
  out.append("\n".join(lines + ([""] + notes if notes else [])))
  lines = ["| prompts / chip | prompts per batch (slice) | batches for "
           f"{args.num_prompts:,} prompts | time per batch = prefill + {args.steps} x step | "
           f"images/s per chip | {args.num_prompts // 1000}k prompts take |",
           "|---|---|---|---|---|---|"]
  arith = []
  for r in results:
    st, pt = r["step"]["seconds"], r["prefill"]["seconds"]
    if st is None or pt is None:
      lines.append(f"| {r['prompts_per_chip']} | {r['prompts_per_batch']} | n/a | n/a | n/a | n/a |")
      continue
    batches = math.ceil(args.num_prompts / r["prompts_per_batch"])
    per_batch = pt + r["steps"] * st
    total = batches * per_batch
    lines.append(f"| {r['prompts_per_chip']} | {r['prompts_per_batch']} | {batches} | {per_batch:.2f} s | "
                 f"{r['prompts_per_batch'] / per_batch / r['chips']:.3f} | {total / 60:.1f} min |")
    arith.append(f"- {r['prompts_per_chip']} prompts per chip: ceil({args.num_prompts:,} / {r['prompts_per_batch']}) "
                 f"= {batches} batches x ({pt * 1e3:.1f} ms prefill + {r['steps']} x {st * 1e3:.1f} ms) = "
                 f"{batches} x {per_batch:.2f} s = {total:.0f} s = {total / 60:.1f} min on {r['topology']} "
                 f"({r['chips']} chips); without rounding up the last batch: "
                 f"{args.num_prompts / r['prompts_per_batch'] * per_batch / 60:.1f} min")
  out.append("\n".join(lines))
  out.append("\n".join(arith))
  return "\n\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("(a) CPU, measured")
  g.add_argument("--skip-cpu", action="store_true", help="skip part (a)")
  g.add_argument("--cpu-models", nargs="+", default=["tiny"],
                 help="tiny: configs/tiny.py's sizes; small: benchmarks/sampling_cache.py's model, about 0.6 s "
                      "per step here (default: tiny)")
  g.add_argument("--cpu-steps", type=int, nargs="+", default=[50, 250], help="denoising steps (default: 50 250)")
  g.add_argument("--cpu-prompts", type=int, default=32, help="prompts per call (default: %(default)s)")
  g.add_argument("--cpu-caption", type=int, default=16, help="caption tokens per prompt (default: %(default)s)")
  g.add_argument("--repeats", type=int, default=3, help="timed calls per cell, median (default: %(default)s)")
  g = p.add_argument_group("(b) TPU, AOT estimate")
  g.add_argument("--skip-tpu", action="store_true", help="skip part (b)")
  g.add_argument("--config", default="configs/llama3_8b_lmfusion.py",
                 help="run config; its mesh preset for --topology is used when it has one (default: %(default)s)")
  g.add_argument("--topology", default="v5p-128", help="TPU slice (default: %(default)s = 64 chips)")
  g.add_argument("--prompts-per-chip", type=int, nargs="+", default=[4, 8, 16],
                 help="prompts per chip per batch; rows = 2x that with CFG (default: 4 8 16)")
  g.add_argument("--prefix", type=int, default=77,
                 help="cached prefix slots per row (`BOS caption BOI`, left-padded; default: %(default)s)")
  g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's sampling.steps)")
  g.add_argument("--num-prompts", type=int, default=30_000, help="prompts of the job (default: 30,000, COCO)")
  g.add_argument("--param-rule", action="append", default=[], metavar="NAME=AXES",
                 help="place parameters with this logical-axis rule instead of lmfusion_jax/sharding.py's (e.g. "
                      "conv_out=none: U-Net weights replicated); repeatable; AXES: none or mesh axes joined by ','")
  g.add_argument("--cost", choices=("unrolled", "scaled"), default="unrolled",
                 help="cost figures from one compile with every layer unrolled (default; 2-5 minutes for the "
                      "8B denoising step here) or from 2- and 3-layer compiles extrapolated per layer")
  g.add_argument("--check-scaled", type=int, nargs="*", default=[8],
                 help="prompts/chip values whose denoising step is also costed the scaled way, as a check and for "
                      "the per-layer breakdown (default: 8)")
  p.add_argument("--json", default="", help="also write every figure to this JSON file")
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad}")

  from lmfusion_jax.run_config import apply_overrides, load_config, sampling_defaults
  preset = args.config if ":" in args.config else f"{args.config}:{args.topology}"
  try:
    cfg = load_config(preset)
  except ValueError:        # the config has no mesh preset for this topology: its default mesh
    preset = args.config
    cfg = load_config(preset)
  cfg = apply_overrides(cfg, overrides)
  sampling = sampling_defaults(cfg)
  args.steps = args.steps or int(sampling["steps"])
  stamp = datetime.date.today().isoformat()
  cmd = " ".join(["python benchmarks/sampling_at_scale.py", *(argv if argv is not None else sys.argv[1:])])
  print(f"Command: `{cmd}` — machine: {machine()} — {stamp}\n")
  print(f"Sampling settings (config `sampling`): {sampling['sampler'].upper()}, CFG {sampling['cfg_scale']} "
        f"(conditional + unconditional rows in one batch), seed 0.\n")
  report = {"machine": machine(), "date": stamp, "sampling": sampling}
  if not args.skip_cpu:
    load0 = os.getloadavg()[0]
    rows = cpu_part(args, sampling)
    load1 = os.getloadavg()[0]
    report["cpu"] = rows
    report["cpu_load_average"] = [load0, load1]
    print(f"(a) CPU, measured: `generate_images` on this host ({jax.devices()[0].device_kind} x "
          f"{len(jax.devices())} JAX device), {args.cpu_prompts} prompts of {args.cpu_caption} random caption "
          f"tokens per call, median of {args.repeats} calls after a warm-up call; 1-minute load average "
          f"{load0:.1f} before, {load1:.1f} after (2 = both cores busy)\n")
    print(cpu_table(rows, sampling) + "\n")
  if not args.skip_tpu:
    results = tpu_part(args, cfg, sampling)
    report["tpu"] = results
    r0 = results[0]
    print(f"(b) TPU, AOT estimate: `{preset}` on {r0['topology']} ({r0['chips']} chips, {r0['device_kind']}, "
          f"mesh data {r0['mesh']['data']} x fsdp {r0['mesh']['fsdp']} x tensor {r0['mesh']['tensor']}"
          f"{', parameter rules changed: ' + ', '.join(args.param_rule) if args.param_rule else ''}), libtpu "
          f"compile-only devices; {r0['n_layers']} layers, {r0['image_tokens']} image "
          f"tokens per image, cached prefix of {r0['prefix']} slots, {args.steps} {sampling['sampler'].upper()} "
          f"steps, CFG {sampling['cfg_scale']}; cost: {r0['step']['source']}; memory: the whole "
          f"{args.steps}-step chain compiled as configured\n")
    print(tpu_tables(results, args))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main())
