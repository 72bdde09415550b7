"""`lmfusion-jax export-llava`: a LLaVA params checkpoint (convert-llava) -> a Hugging Face LLaVA / LLaVA-NeXT
folder, bit for bit what convert-llava read.

  lmfusion-jax export-llava --checkpoint gs://bucket/llava_next_8b_fusion --out ./llava_next_8b_hf

Every text and vision tensor under the name it was read from, in its stored dtype; config.json,
preprocessor_config.json and generation_config.json as they came; the tokenizer files. The image (generation)
branch has no place in a HF LLaVA folder and is not exported. LLaVAFusion training never changes text or vision,
so the converted checkpoint (a training run's init_from) is the one to export.
"""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="LLaVA params checkpoint written by convert-llava")
  p.add_argument("--out", required=True, help="Hugging Face folder to create")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors shard, e.g. 5GB or 500MB (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
  from lmfusion_jax.convert.llama_checkpoint import parse_size
  from lmfusion_jax.convert.llava_checkpoint import export_llava
  t0 = time.time()
  cfg = export_llava(args.checkpoint, args.out, overwrite=args.overwrite,
                     max_shard_bytes=parse_size(args.max_shard_size))
  kind = "LlavaNextForConditionalGeneration" if cfg.is_next else "LlavaForConditionalGeneration"
  print(f"wrote {args.out}: {kind} (text in {cfg.text.param_dtype}, vision in {cfg.vision.param_dtype}) "
        f"in {time.time() - t0:.1f}s")
  return 0
