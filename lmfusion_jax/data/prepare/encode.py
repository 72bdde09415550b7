"""Pixels -> what a record stores: VAE latents (batched, jitted, over this process's devices), the pixels
themselves (no VAE: pixel-space latents, as the digits dataset and `latents_from_files` without a VAE), or
PNG bytes (--encode none).

  Encoder(mode, image_size, vae_dir, batch_size)
    .features                       the TFDS features of a record
    .encode(ids, captions, pixels)  -> [(id, example dict) or (id, None) for a NaN/Inf latent]

With a VAE every call is padded to one fixed batch (a multiple of the local device count), so one compiled
program serves every batch, and a record's latent depends only on the batch it is encoded in: the batches of
an input shard are the same whichever process, or how many processes, encode it.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from lmfusion_jax.data.prepare.records import png_bytes, to_model_range
from lmfusion_jax.errors import UserError

MODES = ("vae", "pixels", "none")


class Encoder:

  def __init__(self, mode: str, image_size: int, vae_dir: Optional[str] = None, batch_size: int = 16):
    if mode not in MODES:
      raise UserError(f"encode mode {mode!r}: not one of {MODES}")
    self.mode, self.image_size = mode, image_size
    self.batch_size = batch_size
    self.vae_cfg = None
    if mode == "vae":
      self._load_vae(vae_dir, batch_size)

  def _load_vae(self, vae_dir, batch_size: int) -> None:
    import jax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lmfusion_jax.checkpoints.vae import load_vae
    from lmfusion_jax.models.vae import encode_latents
    cfg, vae = load_vae(vae_dir)
    f = cfg.downsample_factor
    if self.image_size % f:
      raise UserError(f"--image-size {self.image_size} is not divisible by the VAE's downsample factor {f}")
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)   # rounded up: every device gets rows
    mesh = Mesh(np.asarray(devices), ("data",))
    self._rows = NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(vae)
    self._state = jax.device_put(state, NamedSharding(mesh, P()))     # a copy of the VAE on every device
    self._fn = jax.jit(lambda st, x: encode_latents(nnx.merge(graphdef, st), x))
    self.vae_cfg = cfg

  @property
  def latent_shape(self) -> tuple:
    s = self.image_size
    if self.mode == "vae":
      f = self.vae_cfg.downsample_factor
      return (s // f, s // f, self.vae_cfg.latent_channels)
    return (s, s, 3)

  @property
  def features(self):
    import tensorflow_datasets as tfds
    from lmfusion_jax.data.tfds_image_captions import record_features
    if self.mode == "none":
      return tfds.features.FeaturesDict({
          "caption": tfds.features.Text(),
          "image": tfds.features.Image(shape=(self.image_size, self.image_size, 3), encoding_format="png"),
          "id": tfds.features.Text(),
      })
    return record_features(self.latent_shape)

  def fields(self) -> dict:
    """What each record field holds (written to the dataset's metadata)."""
    s = self.image_size
    out = {"caption": "the caption (UTF-8, stripped)", "id": "the record's source: shard file/key, or the file"}
    if self.mode == "none":
      out["image"] = (f"PNG bytes of the {s}x{s} 8-bit RGB image (center crop, bicubic); read as uint8 "
                      f"[{s}, {s}, 3]; encode online with the VAE after mapping to [-1, 1] (x / 127.5 - 1)")
    elif self.mode == "pixels":
      out["latent"] = f"float32 {list(self.latent_shape)}: the {s}x{s} RGB image in [-1, 1] (no VAE)"
    else:
      out["latent"] = (f"float32 {list(self.latent_shape)}: scaled VAE posterior mean of the {s}x{s} image "
                       f"in [-1, 1]")
    return out

  def describe(self) -> dict:
    """The options that decide the records' values (for the fingerprint of a run)."""
    d = {"mode": self.mode, "image_size": self.image_size}
    if self.vae_cfg is not None:
      d["vae_config"] = json.loads(json.dumps(self.vae_cfg.to_dict(), default=str))
    return d

  def encode(self, ids, captions, pixels: np.ndarray) -> list:
    """Up to batch_size records (uint8 pixels [n, S, S, 3]) -> [(id, example or None when not finite)]."""
    n = len(ids)
    if self.mode == "none":
      return [(i, {"caption": c, "image": png_bytes(p), "id": i}) for i, c, p in zip(ids, captions, pixels)]
    x = to_model_range(pixels)
    if self.mode == "vae":
      import jax
      if n < self.batch_size:
        x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
      x = np.asarray(self._fn(self._state, jax.device_put(x, self._rows)))[:n]
    out = []
    for i, c, latent in zip(ids, captions, x):
      ok = bool(np.all(np.isfinite(latent)))
      out.append((i, {"caption": c, "latent": latent.astype(np.float32), "id": i} if ok else None))
    return out
