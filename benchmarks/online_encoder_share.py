"""The online encoding's share of an 8B train step (`data.encode=online`), the TPU compiler's estimate.

  python benchmarks/online_encoder_share.py                                   # v5p-128, ~2 min on 2 cores
  python benchmarks/online_encoder_share.py --vae-dtype bfloat16              # a bf16-compute encoder
  python benchmarks/online_encoder_share.py --step-time-s 1.830 --config configs/llama3_8b_lmfusion.py:v5p-128

Compiles only the step's encoding stage (training.online_encoding.encode_pixels: uint8 -> [-1, 1] -> VAE
encoder -> scaled posterior mean, for the run's global image batch on the run's mesh over compile-only TPU
devices; planning.encoder_cost, what `lmfusion-jax plan --config.data.encode=online` runs next to the step
compiles) and sets its estimate against --step-time-s, the train step's estimate from `lmfusion-jax plan` for
the same config (BENCHMARKS.md, "TPU plan": 1.830 s for configs/llama3_8b_lmfusion.py:v5p-128). The full
`lmfusion-jax plan ... --config.data.encode=online` recompiles the step as well (20-35 minutes for 8B).
The VAE is diffusers' sd-vae-ft-mse shape (VAEConfig defaults) unless --config.data.vae_dir names a folder.
"""
import argparse
import dataclasses
import sys

from lmfusion_jax.planning import encoder_cost as encoder_cost_lib
from lmfusion_jax.planning.topology import GIB, make_plan_mesh, parse_topology, topology_devices
from lmfusion_jax.run_config import apply_overrides, load_config, model_configs


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/llama3_8b_lmfusion.py:v5p-128")
  p.add_argument("--topology", default="v5p-128")
  p.add_argument("--step-time-s", type=float, default=1.830, help="the train step's plan estimate (s)")
  p.add_argument("--vae-dtype", default="", help="override the VAE's compute dtype (e.g. bfloat16)")
  args, overrides = p.parse_known_args(argv)
  cfg = apply_overrides(load_config(args.config), ["--config.data.encode=online", *overrides])
  vae_cfg, source = encoder_cost_lib.vae_config(cfg.data)
  if args.vae_dtype:   # the same VAE with another compute dtype
    vae_cfg, source = dataclasses.replace(vae_cfg, dtype=args.vae_dtype), f"{source}, {args.vae_dtype} compute"
  mesh = make_plan_mesh(cfg.mesh, topology_devices(parse_topology(args.topology)))
  _, fcfg, _ = model_configs(cfg)
  e = encoder_cost_lib.encoder_cost(cfg, mesh, fcfg, lambda m: print(m, file=sys.stderr, flush=True),
                                    vae=(vae_cfg, source))
  share = e["seconds"] / (e["seconds"] + args.step_time_s)
  print("| config | topology | VAE | images / step (/ chip) | encoder est. | encoder FLOPs / step | temporaries / chip "
        "| step est. | encoder share of step + encoder |")
  print("|---|---|---|---|---|---|---|---|---|")
  print(f"| {args.config} | {args.topology} | {e['vae']} | {e['images_per_step']} ({e['images_per_chip']:g}) | "
        f"{e['seconds'] * 1e3:.1f} ms | {e['flops_per_step']:.4g} | {e['temp_bytes'] / GIB:.2f} GiB | "
        f"{args.step_time_s:.3f} s | {share:.1%} |")


if __name__ == "__main__":
  main()
