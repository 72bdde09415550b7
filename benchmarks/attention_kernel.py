"""One layer's attention, forward + backward, on a v5p chip: the XLA reference vs the Pallas flash kernel,
and the fraction of tiles the block-sparse kernel skips on the 8B training layout.

  python benchmarks/attention_kernel.py [--topology v5p-8] [--rows-per-chip 4] [--seq 4096] [--rows 256]
                                        [--no-compile]

Tile sparsity: documents of synthetic captions (lengths drawn per distribution below) go through the data
pipeline's own functions (data.sequences.build_document with the config's caption-first / dropout draws,
data.packing.pack_documents into rows of configs/llama3_8b_lmfusion.py: 3072 text slots + 4 images x 256
tokens), laid out as the model attends them ([image | text]); the kernel's block masks
(models/flash_blocks.py, blocks 512 x 512: flash_attention's defaults, which the config uses) classify each
tile. Forward and backward skip the same (EMPTY) tiles.

Compile: Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16), the 8B configs' rows
per chip, compiled for the TPU target on this CPU host (libtpu compile-only devices; nothing runs). Prints
the compiler's FLOPs, its time estimate and the temporaries, per chip. Token info is traced there, so the
kernel's cost estimate is the dense one scaled by `tile_fraction` (flash_attention.py); the rows with a
fraction pass the measured one. Model FLOPs of attention training are 12 * rows * heads * S^2 * head_dim
(forward 4, backward 8); the kernel computes 14 per computed tile (its backward recomputes QK^T). Needs
libtpu (`pip install '.[tpu]'` or the test extra).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from lmfusion_jax import sharding  # noqa: E402
from lmfusion_jax.data.packing import pack_documents  # noqa: E402
from lmfusion_jax.data.sequences import SequenceSpec, build_document  # noqa: E402
from lmfusion_jax.models import attention as attn_lib  # noqa: E402
from lmfusion_jax.models import flash_blocks as fb  # noqa: E402
from lmfusion_jax.models.flash_attention import LANES, SUBLANES, flash_attention  # noqa: E402
from lmfusion_jax.models.mask import TokenInfo, image_info, text_info  # noqa: E402
from lmfusion_jax.planning import flops as flops_lib  # noqa: E402
from lmfusion_jax.planning import topology  # noqa: E402
from lmfusion_jax.run_config import load_config  # noqa: E402

CONFIG = "configs/llama3_8b_lmfusion.py"
BLOCK = 512
# caption length distributions (tokens, before BOS/BOI/EOI/EOS): lognormal, clipped to [1, 300]
CAPTIONS = {"short (alt-text, median 12)": (12, 0.6), "long (dense recaptions, median 90)": (90, 0.5)}
SPECIAL = dict(bos=1, eos=2, boi=3, eoi=4)


def training_rows(n_rows: int, median: float, sigma: float, seed: int = 0):
  """(TokenInfo [n_rows, 4096] of packed training rows, [image | text] as the model attends them; text
  padding fraction; documents per row)."""
  data = load_config(CONFIG).data
  spec = SequenceSpec(text_len=data.text_len, image_slots=data.image_slots, tokens_per_image=data.tokens_per_image,
                      latent_shape=(1, 1, 1), caption_first_prob=data.caption_first_prob,
                      caption_dropout=data.caption_dropout, order="random")
  rng = np.random.default_rng(seed)

  def docs():
    for n in range(n_rows * data.image_slots + data.image_slots):
      length = int(np.clip(round(rng.lognormal(np.log(median), sigma)), 1, 300))
      record = {"caption": "x" * length, "latent": np.zeros((1, 1, 1), np.float32), "id": str(n)}
      yield build_document(record, lambda s: list(range(10, 10 + len(s))), spec, SPECIAL, seed=seed,
                           example_index=n)
  rows = []
  for row in pack_documents(docs(), data.text_len, data.image_slots, (1, 1, 1)):
    rows.append(row)
    if len(rows) == n_rows:
      break
  r = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  img = image_info(jnp.asarray(r["image_positions"]), jnp.asarray(r["image_segment_ids"]), data.tokens_per_image)
  txt = text_info(jnp.asarray(r["text_positions"]), jnp.asarray(r["text_segment_ids"]))
  return TokenInfo.concat([img, txt]), float(np.mean(r["text_segment_ids"] == 0)), float(
      np.mean([row["text_segment_ids"].max() for row in rows]))


def sparsity(n_rows: int) -> dict:
  print(f"Tile sparsity on the training layout of {CONFIG} (seq 4096 = 4 images x 256 + 3072 text slots, "
        f"blocks {BLOCK} x {BLOCK}, {n_rows} packed rows per caption distribution; forward and backward skip "
        "the same tiles):\n")
  print("| captions (tokens) | documents / row | text padding | tiles skipped (EMPTY) | FULL (unmasked) | "
        "PARTIAL (masked) |")
  print("|---|---|---|---|---|---|")
  fractions = {}
  for name, (median, sigma) in CAPTIONS.items():
    info, pad, docs = training_rows(n_rows, median, sigma)
    kind = np.asarray(fb.tile_kinds(info, info, BLOCK, BLOCK))
    st = fb.tile_stats(kind)
    fractions[name] = 1.0 - st["empty"]
    print(f"| {name} | {docs:.2f} | {pad:.1%} | {st['empty']:.1%} | {st['full']:.1%} | {st['partial']:.1%} |")
    if name.startswith("long"):
      rows_info = TokenInfo(*(x[:4] for x in info))
      shapes = fb.Shapes(4, 32, 8, 4096, 4096, BLOCK, BLOCK, 128, 2, LANES, SUBLANES)
      masks = fb.block_masks(rows_info, rows_info, BLOCK, BLOCK)
      est = {(d, bwd): fb.cost(shapes, masks if d == "sparse" else None, backward=bwd)
             for d in ("dense", "sparse") for bwd in (False, True)}
  print("\nKernel cost estimate per chip (4 rows of the long-caption layout, 32 / 8 heads x 128, bf16), dense "
        "grid vs its block masks:\n")
  print("| kernel | tiles | flops | exp + log | HBM bytes |")
  print("|---|---|---|---|---|")
  for bwd, kname in ((False, "forward"), (True, "backward")):
    for d in ("dense", "sparse"):
      f, t, b = est[(d, bwd)]
      print(f"| {kname} | {'all' if d == 'dense' else 'computed (non-EMPTY)'} | {f:.3e} | {t:.3e} | {b:.3e} |")
  print()
  return fractions


def compile_attention(impl: str, mesh, rows: int, seq: int, heads=32, kv_heads=8, head_dim=128,
                      tile_fraction=None):
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch)   # noqa: E731
  q = sds((rows, seq, heads, head_dim), jnp.bfloat16)
  k = sds((rows, seq, kv_heads, head_dim), jnp.bfloat16)
  v = sds((rows, seq, kv_heads, head_dim), jnp.bfloat16)
  info = TokenInfo(*(sds((rows, seq), jnp.int32) for _ in range(3)))

  def attend(q, k, v, info):
    if tile_fraction is not None:
      return flash_attention(q, k, v, info, info, tile_fraction=tile_fraction)
    return attn_lib.dot_product_attention(q, k, v, info, info, impl)

  def fwd_bwd(q, k, v, info):
    loss = lambda q, k, v: attend(q, k, v, info).astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh):
    return jax.jit(fwd_bwd).lower(q, k, v, info).compile()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--rows-per-chip", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--rows", type=int, default=256, help="packed rows per caption distribution (sparsity)")
  p.add_argument("--no-compile", action="store_true", help="only the tile sparsity (no libtpu needed)")
  a = p.parse_args(argv)
  fractions = sparsity(a.rows)
  if a.no_compile:
    return 0
  devices = topology.topology_devices(topology.parse_topology(a.topology))
  mesh = sharding.make_mesh(1, len(devices), 1, devices=devices)
  peak = flops_lib.peak_flops_per_device(devices[0].device_kind)
  model = 12 * a.rows_per_chip * 32 * a.seq ** 2 * 128
  print(f"{devices[0].device_kind}, {a.rows_per_chip} rows x {a.seq} tokens per chip, 32 heads / 8 KV heads "
        f"x 128, bf16; model FLOPs (fwd+bwd) {model:.3e} per chip\n")
  print("| attention | compiled FLOPs / chip | est. time | model FLOPs / (time x peak) | temporaries / chip |")
  print("|---|---|---|---|---|")
  runs = [("xla", "xla", None), ("flash (estimate: every tile)", "flash", None)]
  runs += [(f"flash (estimate: tile_fraction {f:.3f}, {name.split(' (')[0]} captions)", "flash", f)
           for name, f in fractions.items()]
  for label, impl, frac in runs:
    c = compile_attention(impl, mesh, a.rows_per_chip * len(devices), a.seq, tile_fraction=frac)
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    t = ca["optimal_seconds"]
    temp = c.memory_analysis().temp_size_in_bytes
    # model FLOPs count every tile, so the ratio means nothing for a kernel that skips tiles
    ratio = f"{model / (t * peak):.1%}" if frac is None else "-"
    print(f"| {label} | {ca['flops']:.3e} | {t * 1e3:.2f} ms | {ratio} | {temp / 2 ** 30:.2f} GiB |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
