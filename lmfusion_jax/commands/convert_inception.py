"""`lmfusion-jax convert-inception`: pytorch-fid's Inception weights -> the Flax FID Inception folder."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
      "Convert pytorch-fid's Inception-v3 weights (pt_inception-2015-12-05-*.pth, a state_dict read with "
      "torch.load(weights_only=True), or a .safetensors file with the same keys) into the Flax FID Inception "
      "that `lmfusion-jax fid-stats` loads. Every tensor is checked (name and shape) first. The output folder "
      "is written under a temporary name and renamed, so it is complete or absent.")
  p.epilog = ("example: lmfusion-jax convert-inception --weights pt_inception-2015-12-05-6726825d.pth "
              "--out inception_fid")
  p.add_argument("--weights", required=True, help="pytorch-fid's weight file (.pth) or a .safetensors file")
  p.add_argument("--out", required=True, help="output folder (must not exist)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
  import jax
  import numpy as np
  from flax import nnx
  from lmfusion_jax.checkpoints.files import absolute_path
  from lmfusion_jax.convert.inception_weights import convert_inception, save_inception
  weights = absolute_path(args.weights)
  model = convert_inception(weights)
  out = save_inception(model, absolute_path(args.out), source=weights, overwrite=args.overwrite)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model)))
  print(f"convert-inception: wrote {out} ({n:,} values: FID Inception-v3, pool3 features [N, 2048])")
  return 0
