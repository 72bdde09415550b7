"""`lmfusion-jax export-llama`: the `text` branch of any checkpoint -> a Hugging Face Llama folder.

  lmfusion-jax export-llama --checkpoint gs://bucket/llama32_1b --out ./llama32_1b_hf

Writes config.json, generation_config.json and safetensors shards (+ index) that
`transformers.LlamaForCausalLM.from_pretrained` loads. Leaves are read from the checkpoint one at a time.
The image branch is not exported (the text branch is the Llama). The tokenizer that travels with the
checkpoint (or --tokenizer) is written beside the weights.
"""
from __future__ import annotations

import argparse
import time


from lmfusion_jax.convert import hf_llama, llama_checkpoint

def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="params checkpoint (convert-llama), training workdir or step dir (WORKDIR/checkpoints/STEP)")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer folder to write beside the weights (default: the one that travels with the "
                      "checkpoint; none found: the export has no tokenizer and says so)")
  p.add_argument("--out", required=True, help="Hugging Face folder to create")
  p.add_argument("--dtype", choices=sorted(hf_llama.NUMPY_DTYPES), default=None,
                 help="dtype of the exported tensors (default: as stored in the checkpoint)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors shard, e.g. 5GB or 500MB (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
  t0 = time.time()
  cfg, dtype, tok = llama_checkpoint.export(args.checkpoint, args.out, args.dtype,
                                             llama_checkpoint.parse_size(args.max_shard_size), args.overwrite,
                                             tokenizer_dir=args.tokenizer)
  print(f"wrote {args.out}: LlamaForCausalLM, {cfg.num_params() / 1e6:.2f}M parameters in {dtype}"
        + (f" + the tokenizer of {tok}" if tok else " (no tokenizer travels with the checkpoint: pass "
           "--tokenizer DIR to include one)") + f" in {time.time() - t0:.1f}s")
  return 0
