"""CPU forward throughput (tokens/s) of our Llama vs transformers.LlamaForCausalLM (torch), same weights.

  JAX_PLATFORMS=cpu python benchmarks/forward_throughput.py [--configs tiny,small] [--batch 4] [--seq 256]

Builds a random HF model, converts it with lmfusion_jax.convert.hf_llama, checks the logits agree, and
times full-sequence forwards (logits included) in fp32 in one process: our jitted forward (unrolled and
scanned layers) and torch eager under no_grad. Median of --repeats timed runs after a warm-up.
Prints markdown table rows.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from lmfusion_jax.models import sharded
from lmfusion_jax.convert import hf_llama  # noqa: E402
from timing import timed  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2),
}



def bench(name, batch, seq, repeats):
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(max_position_embeddings=max(2048, seq), **CONFIGS[name])
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d, safe_serialization=True)
    cfg, params = hf_llama.load_hf_text_params(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq))
  tt = torch.tensor(tokens)
  rows = []
  with torch.no_grad():
    ref = hf(tt).logits.numpy()
    t_hf = timed(lambda: hf(tt).logits, repeats)
  for scan in (False, True):
    model = sharded.model(cfg.replace(scan_layers=scan), None, {"text": params})
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    x = jnp.asarray(tokens)
    diff = float(np.abs(np.asarray(fwd(state, x)) - ref).max())
    t_ours = timed(lambda: fwd(state, x).block_until_ready(), repeats)
    rows.append((f"{name} ({'scan' if scan else 'unrolled'})", t_ours, diff))
  n_tok = batch * seq
  out = []
  for label, t_ours, diff in rows:
    out.append(f"| {label}: {cfg.num_params() / 1e6:.1f}M params, batch {batch} x {seq} | "
               f"{n_tok / t_ours:,.0f} | {n_tok / t_hf:,.0f} | {t_hf / t_ours:.2f} | {diff:.1e} |")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="tiny,small")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  print(f"<!-- CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
        f"torch {torch.__version__}, fp32 -->")
  print("| model (fp32, CPU) | ours tokens/s | HF torch tokens/s | ours / HF | max abs logit diff |")
  print("|---|---|---|---|---|")
  for name in args.configs.split(","):
    for row in bench(name, args.batch, args.seq, args.repeats):
      print(row, flush=True)


if __name__ == "__main__":
  main()
