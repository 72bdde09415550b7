"""`lmfusion-jax convert-llava`: a Hugging Face LLaVA / LLaVA-NeXT folder -> a params checkpoint with `text` (the
VLM's Llama), `vision` (tower + projector + image_newline) and `image` (the LLaVAFusion generation branch: copies
of the text layers + fresh image in/out modules).

  lmfusion-jax convert-llava --hf-dir llama3-llava-next-8b-hf --out gs://bucket/llava_next_8b_fusion

The same flags as convert-llama (the image branch, BOI/EOI from the folder's tokenizer). Text leaves stream
chunk by chunk as in convert-llama; the folder's config.json / preprocessor_config.json / generation_config.json
and tokenizer travel with the checkpoint, so `export-llava` writes the folder back bit for bit. Every tensor is
checked against config.json before anything is written; on any error nothing is left at --out.
"""
from __future__ import annotations

import argparse
import time

from lmfusion_jax.commands import convert_llama


def add_arguments(p: argparse.ArgumentParser) -> None:
  convert_llama.add_conversion_arguments(
      p, "write `text` + `vision` only (the VLM as it came, e.g. to export it again), no image branch")


def run(args) -> int:
  from lmfusion_jax.convert.llava_checkpoint import convert_llava
  t0 = time.time()
  fusion_from_args = None if args.text_only else (lambda cfg: convert_llama.fusion_config(args, cfg))
  cfg, fcfg, n = convert_llava(args.hf_dir, args.out, dtype=args.dtype, fusion_cfg=fusion_from_args, seed=args.seed,
                               overwrite=args.overwrite, chunk_mib=args.chunk_mib, progress_desc="convert")
  kind = "LLaVA-NeXT" if cfg.is_next else "LLaVA"
  branches = "text + vision" + ("" if fcfg is None else f" + image ({fcfg.separation}, {fcfg.image_io})")
  ids = "" if fcfg is None else f", BOI/EOI ids {fcfg.boi_id}/{fcfg.eoi_id}"
  print(f"wrote {args.out}: {kind} ({cfg.vision.variant} tower, tensor names '{cfg.hf_layout}'), {branches}, "
        f"{n / 1e6:.2f}M parameters, text in {cfg.text.param_dtype}, vision in {cfg.vision.param_dtype}{ids} "
        f"in {time.time() - t0:.1f}s")
  return 0
