"""Peak host memory of `lmfusion-jax convert-llama` (and `export-llama`) on a ~1B-parameter checkpoint.

  python benchmarks/convert_memory.py [--workdir /tmp/convert_bench] [--dtype bfloat16] [--shards 1]

Writes a randomly initialized HF Llama folder with the Llama-3.2-1B architecture (1.24B parameters, tied
embeddings) straight from numpy, tensor by tensor, then runs each command (convert at several stored chunk
sizes, text only and with the LMFusion image branch; export) in a subprocess and reads its
peak RSS with resource.getrusage(RUSAGE_CHILDREN) (one child per measurement: the parent forks a fresh
measuring process per command). Prints markdown table rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                  eos_token_id=128001, hidden_act="silu", model_type="llama", architectures=["LlamaForCausalLM"],
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})


def hf_tensor_shapes(c):
  d, f, h, kvh, hd = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                      c["num_key_value_heads"], c["head_dim"])
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (kvh * hd, d),
                   p + "self_attn.v_proj.weight": (kvh * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f)})
  return shapes


def write_random_hf(path, dtype: str, shards: int, seed: int = 0) -> int:
  """Random HF checkpoint; returns total safetensors bytes on disk."""
  os.makedirs(path, exist_ok=True)
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  shapes = hf_tensor_shapes(LLAMA32_1B)
  names = list(shapes)
  groups = [names[i::shards] for i in range(shards)]
  rng = np.random.default_rng(seed)
  weight_map = {}
  for k, group in enumerate(groups):
    fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    tensors = {}
    for n in group:
      x = rng.standard_normal(shapes[n], dtype=np.float32)
      x *= 0.02
      tensors[n] = x.astype(np_dtype)
      del x
    save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in group})
    del tensors
  if shards > 1:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**LLAMA32_1B, "torch_dtype": dtype}, f)
  return sum(os.path.getsize(os.path.join(path, x)) for x in os.listdir(path) if x.endswith(".safetensors"))


MEASURE = ("import resource, subprocess, sys, time; t = time.time(); "
           "rc = subprocess.call(sys.argv[1:]); "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t)")


def peak_rss_of(cmd) -> tuple:
  """(exit code, peak RSS bytes, seconds) of `cmd`, run as the only child of a fresh measuring process."""
  out = subprocess.run([sys.executable, "-c", MEASURE] + cmd, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  rc, kib, secs = out.stdout.strip().splitlines()[-1].split()
  if int(rc) != 0:
    raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
  return int(rc), int(kib) * 1024, float(secs)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="/tmp/lmfusion_convert_bench")
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  ap.add_argument("--shards", type=int, default=1, help="number of safetensors files (1 = like Llama-3.2-1B)")
  ap.add_argument("--keep", action="store_true", help="keep the work directory")
  args = ap.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  hf, ckpt, back = (os.path.join(args.workdir, x) for x in ("hf", "ckpt", "hf_back"))
  t = time.time()
  disk = write_random_hf(hf, args.dtype, args.shards)
  n_params = sum(int(np.prod(s)) for s in hf_tensor_shapes(LLAMA32_1B).values())
  print(f"<!-- wrote {n_params / 1e9:.3f}B-parameter random HF checkpoint ({disk / 2**30:.2f} GiB, "
        f"{args.shards} file(s)) in {time.time() - t:.0f}s -->")
  cli = [sys.executable, "-m", "lmfusion_jax.cli"]
  base = peak_rss_of([sys.executable, "-c", "import jax, orbax.checkpoint, flax, safetensors, lmfusion_jax.cli; "
                      "import lmfusion_jax.checkpoints.params, lmfusion_jax.convert.hf_llama"])
  runs = [
      ("convert-llama --text-only (default: 64 MiB chunks)", ["--text-only"], ckpt),
      ("convert-llama --text-only --chunk-mib 16", ["--text-only", "--chunk-mib", "16"], ckpt + "_16"),
      ("convert-llama --text-only --chunk-mib 0 (one chunk per leaf)", ["--text-only", "--chunk-mib", "0"],
       ckpt + "_1chunk"),
      ("convert-llama, text + image branch (deep copies, U-Net io)", [], ckpt + "_fused"),
  ]
  rows = []
  for name, flags, out in runs:
    rows.append((name, peak_rss_of(cli + ["convert-llama", "--hf-dir", hf, "--out", out] + flags)))
    if out != ckpt:
      shutil.rmtree(out, ignore_errors=True)
  rows.append(("export-llama", peak_rss_of(cli + ["export-llama", "--checkpoint", ckpt, "--out", back,
                                                  "--max-shard-size", "5GB"])))
  print("| step | params | on-disk safetensors | peak RSS | peak RSS / on-disk | wall |")
  print("|---|---|---|---|---|---|")
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"| imports only (baseline) | - | - | {gib(base[1])} | - | {base[2]:.0f} s |")
  for name, (_, rss, secs) in rows:
    print(f"| {name}, {args.dtype}, {args.shards} file(s) | {n_params / 1e9:.2f}B | {gib(disk)} | {gib(rss)} | "
          f"{rss / disk:.2f} | {secs:.0f} s |")
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
