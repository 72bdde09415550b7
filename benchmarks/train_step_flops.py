"""Frozen-text vs trainable-text train step: compiled FLOPs (XLA cost analysis), the analytic count, and
optimizer-state bytes.

  python benchmarks/train_step_flops.py
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax import sharding
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts
from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.run_config import base_config


def fake_batch(b, t, slots, fc):
  n = fc.tokens_per_image
  return {
      "tokens": np.ones((b, t), np.int32), "text_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      "text_segment_ids": np.ones((b, t), np.int32), "targets": np.ones((b, t), np.int32),
      "loss_mask": np.ones((b, t), np.float32),
      "latents": np.zeros((b, slots, fc.latent_size, fc.latent_size, fc.latent_channels), np.float32),
      "image_positions": np.tile(t + n * np.arange(slots, dtype=np.int32), (b, 1)),
      "image_segment_ids": np.ones((b, slots), np.int32), "image_first": np.zeros((b, slots), bool)}


def compiled_cost(lc, fc, optim_cfg, b, t, slots):
  mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  spec = ts.StepSpec(lc, fc, DiffusionConfig(), optim.trainable_branches(optim_cfg))
  tx = optim.make_optimizer(optim_cfg, 1000)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
           for k, v in fake_batch(b, t, slots, fc).items()}
  abstract = ts.abstract_state(spec, tx, mesh)
  with jax.set_mesh(mesh):
    compiled = ts.jit_train_step(spec, tx, mesh, batch).lower(abstract, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  opt_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract["opt_state"]))
  return spec, float(cost["flops"]), int(opt_bytes)


def main():
  lc = LlamaConfig(vocab_size=2048, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1024,
                   bos_id=1, eos_id=2)
  fc = FusionConfig(image_io="linear", latent_size=16, latent_channels=4, patch_size=2, time_embed_dim=64)
  b, t, slots = 4, 192, 1
  oc = base_config().optim
  rows = []
  for name, text_lr in (("frozen text (eta_text = 0)", 0.0), ("trainable text (eta_text = 1e-4)", 1e-4)):
    oc.text_lr = text_lr
    spec, fl, ob = compiled_cost(lc, fc, oc, b, t, slots)
    ana = flops_lib.train_step_flops(lc, fc, b, t, slots, text_lr > 0, attention="full")   # XLA attention
    rows.append((name, fl, ana["total"], ob))
  print(f"config: dim {lc.dim}, {lc.n_layers} layers, ffn {lc.ffn_dim}, vocab {lc.vocab_size}, batch {b} x "
        f"({t} text + {slots} x {fc.tokens_per_image} image tokens), deep separation, linear patchify")
  print("| train step | compiled GFLOP | analytic GFLOP | compiled / analytic | optimizer state MiB |")
  print("|---|---|---|---|---|")
  for name, fl, ana, ob in rows:
    print(f"| {name} | {fl / 1e9:.4f} | {ana / 1e9:.4f} | {fl / ana:.3f} | {ob / 2**20:.2f} |")
  print(f"frozen / trainable compiled FLOPs: {rows[0][1] / rows[1][1]:.3f}; "
        f"optimizer bytes ratio: {rows[0][3] / rows[1][3]:.3f}")


if __name__ == "__main__":
  main()
