"""`lmfusion-jax export-llama`: the `text` branch of a params checkpoint -> a Hugging Face Llama folder.

  lmfusion-jax export-llama --checkpoint gs://bucket/llama32_1b --out ./llama32_1b_hf

Writes config.json, generation_config.json and safetensors shards (+ index) that
`transformers.LlamaForCausalLM.from_pretrained` loads. Leaves are read from the checkpoint one at a time.
The image branch is not exported (the text branch is the Llama).
"""
from __future__ import annotations

import argparse
import time


from lmfusion_jax.convert import hf_llama, llama_checkpoint

def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="params checkpoint directory (from convert-llama or training)")
  p.add_argument("--out", required=True, help="Hugging Face folder to create")
  p.add_argument("--dtype", choices=sorted(hf_llama.NUMPY_DTYPES), default=None,
                 help="dtype of the exported tensors (default: as stored in the checkpoint)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors shard, e.g. 5GB or 500MB (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args) -> int:
  t0 = time.time()
  cfg, dtype = llama_checkpoint.export(args.checkpoint, args.out, args.dtype,
                                        llama_checkpoint.parse_size(args.max_shard_size), args.overwrite)
  print(f"wrote {args.out}: LlamaForCausalLM, {cfg.num_params() / 1e6:.2f}M parameters in {dtype} "
        f"in {time.time() - t0:.1f}s")
  return 0
