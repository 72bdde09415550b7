"""Image sampling cost per denoising step: cached caption prefix vs recomputing the prefix every step.

  JAX_PLATFORMS=cpu python benchmarks/sampling_cache.py [--prefix 256] [--batch 4] [--cfg 1.0] [--repeats 3]

A random small LMFusion (U-Net image io, 16x16x4 latents -> 64 image tokens) samples `--batch` images after
a caption prefix of `--prefix` tokens (`BOS caption BOI`). Per-step cost = (time of K2 steps - time of K1
steps) / (K2 - K1) with K1 = 4 and K2 = 12 DDIM steps, so compilation, the one-time prefix prefill and
the final host transfer cancel out; each time is the median of --repeats runs after a warm-up. Both paths
produce the same latents (checked; the predicted x0 is clipped to [-1, 1] so the random model's samples stay
bounded). Prints a markdown table row. CPU figures vary with machine load; the ratio is the quantity.
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
from timing import timed  # noqa: E402

STEPS = (4, 12)


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
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--prefix", type=int, default=256, help="caption tokens in the prefix")
  ap.add_argument("--batch", type=int, default=4, help="images sampled together")
  ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale (!= 1 doubles the rows)")
  ap.add_argument("--repeats", type=int, default=3)
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
  per_step = {}
  for use_cache in (True, False):
    t1, t2 = (timed(lambda k=k: run(k, use_cache), args.repeats) for k in STEPS)
    per_step[use_cache] = (t2 - t1) / (STEPS[1] - STEPS[0])
  n_img = model.fcfg.tokens_per_image
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; prefix {args.prefix + 2} tokens, "
        f"{n_img} image tokens, batch {args.batch}, cfg {args.cfg}; max |cached - recomputed| = {diff:.2e}")
  print("| prefix tokens | image tokens | rows | cached ms/step | recompute ms/step | speed-up |")
  print("|---|---|---|---|---|---|")
  rows = args.batch * (2 if args.cfg != 1.0 else 1)
  print(f"| {args.prefix + 2} | {n_img} | {rows} | {per_step[True] * 1e3:.1f} | {per_step[False] * 1e3:.1f} | "
        f"{per_step[False] / per_step[True]:.2f}x |")


if __name__ == "__main__":
  main()
