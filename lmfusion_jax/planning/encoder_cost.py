"""The online encoding's share of a train step (`data.encode="online"`), for `plan`.

The encoding stage of the step (training.online_encoding.encode_pixels: uint8 -> [-1, 1], optional crop /
flip, VAE encoder, scaling) is compiled ALONE for the run's global image batch on the same mesh (compile-only
TPU devices), and its cost analysis read: per-device FLOPs, the compiler's time estimate, temporaries. The
train step itself is planned as for precomputed latents; the step with online encoding is estimated as the
sum (the encoder runs before the model and shares nothing with it but the chips). The VAE is data.vae_dir's
(only its config.json is read) or, with data.vae_dir empty, diffusers' sd-vae-ft-mse shape (VAEConfig()
defaults: block_out_channels 128, 256, 512, 512, 2 resnets per block, 4 latent channels).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmfusion_jax.planning.cost import _cost, _timed
from lmfusion_jax.sharding import batch_sharding
from lmfusion_jax.training import online_encoding


def vae_config(data_cfg):
  """(VAEConfig, where it came from)."""
  from lmfusion_jax.models.vae import VAEConfig
  if data_cfg.get("vae_dir"):
    from etils import epath
    from lmfusion_jax.checkpoints.vae import CONFIG_FILE, read_json
    d = read_json(epath.Path(data_cfg.vae_dir) / CONFIG_FILE, "the VAE's config.json")
    d.pop("format", None)
    return VAEConfig.from_dict(d, source=str(data_cfg.vae_dir)), str(data_cfg.vae_dir)
  return VAEConfig(), "diffusers sd-vae-ft-mse shape (data.vae_dir empty)"


def encoder_cost(cfg, mesh: Mesh, fcfg, progress: Callable[[str], None] = lambda msg: None,
                 vae: Optional[tuple] = None) -> dict:
  """Per-device cost of encoding one global batch's images on `mesh` (see the module docstring). `vae`:
  (VAEConfig, its description) in place of `vae_config(cfg.data)`."""
  vae_cfg, source = vae or vae_config(cfg.data)
  enc = online_encoding.from_config(cfg.data, vae_cfg)
  s = int(cfg.data.image_size)
  online_encoding.check_latent_shape(enc, s, fcfg, source)
  b, i = int(cfg.data.global_batch_size), int(cfg.data.image_slots)
  pixels = jax.ShapeDtypeStruct((b, i, s, s, 3), jnp.uint8, sharding=batch_sharding(mesh, 5))
  segments = jax.ShapeDtypeStruct((b, i), jnp.int32, sharding=batch_sharding(mesh, 2))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  params = online_encoding.abstract_params(enc, mesh)

  def stage(p, px, seg, key):   # the step's encoding stage: [B, I, S, S, 3] -> [B, I, h, w, C]
    return online_encoding.encode_pixels(enc, p, px, seg > 0, jax.random.wrap_key_data(key))

  fn = jax.jit(stage, out_shardings=batch_sharding(mesh, 5))
  with jax.set_mesh(mesh):
    lowered = fn.lower(params, pixels, segments, rng)
    compiled = _timed(progress, "compiling the VAE encoder (online encoding)", lowered.compile)
  cost = _cost(compiled)
  mem = compiled.memory_analysis()
  param_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  n_dev = mesh.devices.size
  return {"vae": source, "block_out_channels": list(vae_cfg.block_out_channels), "image_size": s,
          "crop_size": enc.crop_size, "images_per_step": b * i, "images_per_chip": b * i / n_dev,
          "seconds": cost["optimal_seconds"], "flops_per_step": cost["flops"] * n_dev,
          "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None,
          "param_bytes_per_chip": param_bytes,
          "source": "the encoding stage compiled alone (not inside the step) on the run's mesh"}
