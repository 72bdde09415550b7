"""Image sampling cost per denoising step: cached caption prefix vs recomputing the prefix every step.

  JAX_PLATFORMS=cpu python benchmarks/sampling_cache.py [--prefix 256] [--batch 4] [--cfg 1.0] [--pairs 15]

A random small LMFusion (U-Net image io, 16x16x4 latents -> 64 image tokens) samples `--batch` images after
a caption prefix of `--prefix` tokens (`BOS caption BOI`). One measurement of a path's per-step cost =
(time of K2 steps - time of K1 steps) / (K2 - K1) with K1 = 4 and K2 = 20 DDIM steps, run back to back, so
compilation, the one-time prefix prefill and the final host transfer cancel out. After a warm-up of each
path, the cached and the recomputing path are measured in --pairs adjacent pairs, alternating which goes
first, so machine-load drift between pairs cancels out of each pair's ratio recomputed / cached. Both paths
produce the same latents (checked; the predicted x0 is clipped to [-1, 1] so the random model's samples stay
bounded). Prints a markdown table (median per-step costs, median and range of the per-pair ratios), the
command, the machine and the date. CPU figures vary with machine load; the ratio is the quantity.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lmfusion_jax import diffusion  # noqa: E402
from lmfusion_jax.inference import image as gi
from lmfusion_jax.models import sharded  # noqa: E402
from lmfusion_jax.models.config import FusionConfig, LlamaConfig  # noqa: E402
from lmfusion_jax.models.fusion import LMFusion  # noqa: E402
import timing  # noqa: E402

STEPS = (4, 20)


def small_model() -> LMFusion:
  lcfg = LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, ffn_dim=768,
                     rope_theta=10000.0, max_seq_len=1024, bos_id=1, eos_id=2)
  fcfg = FusionConfig(latent_size=16, latent_channels=4, patch_size=2, unet_channels=(64, 128), unet_blocks=1,
                      unet_groups=8, time_embed_dim=128, boi_id=3, eoi_id=4)
  graphdef, _ = sharded.graphdef_and_abstract_state(lcfg, fcfg)
  state = jax.jit(lambda: nnx.state(LMFusion(lcfg, fcfg, rngs=nnx.Rngs(0))))()
  rng = np.random.default_rng(0)  # zero-initialized leaves (the eps output layer) made random: eps != 0
  state = jax.tree.map(lambda a: a if jnp.any(a) else jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype),
                       state)
  return nnx.merge(graphdef, state)



def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prefix", type=int, default=256, help="caption tokens in the prefix (default: %(default)s)")
  ap.add_argument("--batch", type=int, default=4, help="images sampled together (default: %(default)s)")
  ap.add_argument("--cfg", type=float, default=1.0,
                  help="guidance scale, != 1 doubles the rows (default: %(default)s)")
  ap.add_argument("--pairs", type=int, default=15, help="interleaved (recomputed, cached) measurement pairs; median "
                  "and range of their ratios (default: %(default)s)")
  args = ap.parse_args()
  model = small_model()
  dcfg = diffusion.DiffusionConfig()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, 2048, args.prefix).tolist() for _ in range(args.batch)]

  def run(steps, use_cache):
    return jax.block_until_ready(gi.generate_images(model, prompts, dcfg, num_steps=steps, sampler="ddim",
                                                    cfg_scale=args.cfg, use_cache=use_cache, clip_x0=1.0))

  a, b = run(STEPS[0], True), run(STEPS[0], False)
  diff = float(jnp.max(jnp.abs(a - b)))

  def per_step(use_cache):
    def measure():
      t1, t2 = (timing.wall(lambda k=k: run(k, use_cache))() for k in STEPS)
      return (t2 - t1) / (STEPS[1] - STEPS[0])
    return measure

  load0 = timing.loadavg()  # the warm-up inside `interleaved` compiles the K2-step programs
  r = timing.interleaved(per_step(False), per_step(True), args.pairs, warmup=1)
  lo, hi = r.ratio_range
  n_img = model.fcfg.tokens_per_image
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; prefix {args.prefix + 2} tokens, "
        f"{n_img} image tokens, batch {args.batch}, cfg {args.cfg}; max |cached - recomputed| = {diff:.2e}")
  print("| prefix tokens | image tokens | rows | cached ms/step | recompute ms/step | recompute / cached: median "
        "of per-pair ratios (range) |")
  print("|---|---|---|---|---|---|")
  rows = args.batch * (2 if args.cfg != 1.0 else 1)
  print(f"| {args.prefix + 2} | {n_img} | {rows} | {r.median_b * 1e3:.1f} | {r.median_a * 1e3:.1f} | "
        f"{r.median_ratio:.2f}x ({lo:.2f}-{hi:.2f}x) |")
  print("ms/step: medians over the pairs. " + r.summary("recompute", "cached"))
  print(r.per_pair("recompute", "cached", unit="ms/step"))
  print(f"command: `{timing.command()}`; machine: {timing.machine()}; 1-min load average {load0} at start, "
        f"{timing.loadavg()} at end")


if __name__ == "__main__":
  main()
