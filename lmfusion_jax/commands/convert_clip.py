"""`lmfusion-jax convert-clip`: a Hugging Face CLIPModel folder (safetensors) -> a Flax CLIP checkpoint folder."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.description = (
      "Convert a Hugging Face CLIPModel folder (config.json + model.safetensors + tokenizer files, optionally "
      "preprocessor_config.json; e.g. a local copy of openai/clip-vit-large-patch14) into the Flax CLIP checkpoint "
      "that CLIP score loads: config.json (model and image preprocessing settings), params.safetensors and the "
      "tokenizer files. Only safetensors and JSON are read. The output folder is written under a temporary name "
      "and renamed, so it is complete or absent.")
  p.epilog = "example: lmfusion-jax convert-clip --hf-dir ~/clip-vit-large-patch14 --out gs://bucket/clip"
  p.add_argument("--hf-dir", required=True,
                 help="Hugging Face CLIPModel folder (config.json, *.safetensors, tokenizer files)")
  p.add_argument("--out", required=True, help="output folder for the Flax CLIP checkpoint (must not exist or be empty)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
  import jax
  import numpy as np
  from flax import nnx
  from lmfusion_jax.checkpoints.files import absolute_path
  from lmfusion_jax.checkpoints.clip import save_clip
  from lmfusion_jax.convert.hf_clip import image_processor_from_hf, load_hf_clip
  hf_dir = absolute_path(args.hf_dir)
  cfg, model = load_hf_clip(hf_dir)
  processor = image_processor_from_hf(hf_dir, cfg.vision.image_size)
  out = save_clip(model, cfg, processor, absolute_path(args.out), tokenizer_from=hf_dir, source=hf_dir,
                  overwrite=args.overwrite)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  v, t = cfg.vision, cfg.text
  print(f"convert-clip: wrote {out} ({n:,} parameters: vision {v.num_layers}x{v.hidden_size} at "
        f"{v.image_size}px/patch {v.patch_size}, text {t.num_layers}x{t.hidden_size}, "
        f"projection {cfg.projection_dim}; images resized to {processor.shortest_edge or processor.resize_hw}, "
        f"cropped to {list(processor.crop_hw)})")
  return 0
