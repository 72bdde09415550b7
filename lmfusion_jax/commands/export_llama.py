"""`lmfusion-jax export-llama`: the `text` branch of a params checkpoint -> a Hugging Face Llama folder.

  lmfusion-jax export-llama --checkpoint gs://bucket/llama32_1b --out ./llama32_1b_hf

Writes config.json, generation_config.json and safetensors shards (+ index) that
`transformers.LlamaForCausalLM.from_pretrained` loads. Leaves are read from the checkpoint one at a time.
The image branch is not exported (the text branch is the Llama).
"""
from __future__ import annotations

import argparse
import re
import time

import numpy as np

from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.convert import hf_llama
from lmfusion_jax.models.config import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
  """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise ConfigError(f"--max-shard-size={text!r}: expected a size like 5GB, 500MB or 2GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="params checkpoint directory (from convert-llama or training)")
  p.add_argument("--out", required=True, help="Hugging Face folder to create")
  p.add_argument("--dtype", choices=sorted(hf_llama.NUMPY_DTYPES), default=None,
                 help="dtype of the exported tensors (default: as stored in the checkpoint)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors shard, e.g. 5GB or 500MB (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def export(checkpoint, out, dtype=None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False):
  """Returns (LlamaConfig, the dtype written)."""
  cfg, _ = params_io.read_model_config(checkpoint)
  meta = params_io.stored_metadata(checkpoint)
  if "text" not in meta:
    raise params_io.CheckpointError(f"{checkpoint}: no `text` branch to export")
  dtype = dtype or str(np.dtype(meta["text"]["embed"].dtype))
  if dtype not in hf_llama.NUMPY_DTYPES:
    raise ConfigError(f"{checkpoint}: stored dtype {dtype!r} cannot be exported; pass --dtype")
  get_leaf = lambda path: np.asarray(params_io.load_params(checkpoint, subtree=f"text/{path}"))
  hf_llama.write_hf_checkpoint(out, cfg.replace(param_dtype=dtype), get_leaf, dtype,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  return cfg, dtype


def run(args) -> int:
  t0 = time.time()
  cfg, dtype = export(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size), args.overwrite)
  print(f"wrote {args.out}: LlamaForCausalLM, {cfg.num_params() / 1e6:.2f}M parameters in {dtype} "
        f"in {time.time() - t0:.1f}s")
  return 0
