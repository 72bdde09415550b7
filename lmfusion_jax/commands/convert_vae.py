"""`lmfusion-jax convert-vae`: a diffusers AutoencoderKL folder (safetensors) -> a Flax VAE checkpoint."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
      "Convert a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, e.g. a local "
      "copy of stabilityai/sd-vae-ft-mse) into the Flax VAE checkpoint that the data pipeline (image -> latents) "
      "and the sampler (latents -> image) load. Only safetensors are read. The output folder is written under a "
      "temporary name and renamed, so it is complete or absent.")
  p.epilog = "example: lmfusion-jax convert-vae --diffusers-dir ~/sd-vae-ft-mse --out gs://bucket/vae"
  p.add_argument("--diffusers-dir", required=True,
                 help="folder holding the diffusers config.json and diffusion_pytorch_model.safetensors")
  p.add_argument("--out", required=True, help="output folder for the Flax VAE checkpoint (must not exist)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
  import jax
  import numpy as np
  from flax import nnx
  from lmfusion_jax.checkpoints.vae import save_vae
  from lmfusion_jax.convert.diffusers_vae import load_diffusers_vae
  cfg, vae = load_diffusers_vae(args.diffusers_dir)
  out = save_vae(vae, cfg, args.out, overwrite=args.overwrite)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(vae, nnx.Param)))
  print(f"convert-vae: wrote {out} ({n:,} parameters, block_out_channels={list(cfg.block_out_channels)}, "
        f"latent_channels={cfg.latent_channels}, scaling_factor={cfg.scaling_factor}, "
        f"shift_factor={cfg.shift_factor})")
  return 0
