"""One layer's attention, forward + backward, on a v5p chip: the XLA reference vs the Pallas flash kernel.

  python benchmarks/attention_kernel.py [--topology v5p-8] [--rows-per-chip 4] [--seq 4096]

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16), the 8B configs' rows per chip,
compiled for the TPU target on this CPU host (libtpu compile-only devices; nothing runs). Prints the
compiler's FLOPs, its time estimate and the temporaries, per chip. Model FLOPs of attention training are
12 * rows * heads * S^2 * head_dim (forward 4, backward 8); the kernel computes 14 (its backward recomputes
QK^T). Needs libtpu (`pip install '.[tpu]'` or the test extra).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lmfusion_jax import sharding  # noqa: E402
from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.planning import topology
from lmfusion_jax.models import attention as attn_lib  # noqa: E402
from lmfusion_jax.models.mask import TokenInfo  # noqa: E402


def compile_attention(impl: str, mesh, rows: int, seq: int, heads=32, kv_heads=8, head_dim=128):
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch)   # noqa: E731
  q = sds((rows, seq, heads, head_dim), jnp.bfloat16)
  k = sds((rows, seq, kv_heads, head_dim), jnp.bfloat16)
  v = sds((rows, seq, kv_heads, head_dim), jnp.bfloat16)
  info = TokenInfo(*(sds((rows, seq), jnp.int32) for _ in range(3)))

  def fwd_bwd(q, k, v, info):
    loss = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, info, info, impl).astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh):
    return jax.jit(fwd_bwd).lower(q, k, v, info).compile()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--rows-per-chip", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  a = p.parse_args(argv)
  devices = topology.topology_devices(topology.parse_topology(a.topology))
  mesh = sharding.make_mesh(1, len(devices), 1, devices=devices)
  peak = flops_lib.peak_flops_per_device(devices[0].device_kind)
  model = 12 * a.rows_per_chip * 32 * a.seq ** 2 * 128
  print(f"{devices[0].device_kind}, {a.rows_per_chip} rows x {a.seq} tokens per chip, 32 heads / 8 KV heads "
        f"x 128, bf16; model FLOPs (fwd+bwd) {model:.3e} per chip\n")
  print("| attention | compiled FLOPs / chip | est. time | model FLOPs / (time x peak) | temporaries / chip |")
  print("|---|---|---|---|---|")
  for impl in ("xla", "flash"):
    c = compile_attention(impl, mesh, a.rows_per_chip * len(devices), a.seq)
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    t = ca["optimal_seconds"]
    temp = c.memory_analysis().temp_size_in_bytes
    print(f"| {impl} | {ca['flops']:.3e} | {t * 1e3:.2f} ms | {model / (t * peak):.1%} | {temp / 2 ** 30:.2f} GiB |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
