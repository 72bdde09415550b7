"""The packed batch: the contract between the data pipeline and the model.

Each row is one packed sequence of one or more documents (examples). Rows are stored modality-sorted:
text slots and image slots live in separate arrays; the order tokens had in the document is given by
`*_positions`, never by array order. Every image occupies `tokens_per_image` consecutive positions
starting at `image_positions`. A row has a fixed text length T and a fixed number of image slots I.

  tokens             int32   [B, T]           text token ids (0 in padding slots)
  text_positions     int32   [B, T]           position of the token inside its document (0-based)
  text_segment_ids   int32   [B, T]           document number inside the row, 1-based; 0 = padding
  targets            int32   [B, T]           the next TEXT token of the same document (0 if none)
  loss_mask          float32 [B, T]           1.0 where `targets` is a real LM target, else 0.0
                                              (0 for BOI: the token after BOI is an image; 0 for the last
                                              token before an image is never needed: it predicts BOI)
  latents            float32 [B, I, H, W, C]  clean image latents (zeros in empty slots)
    or pixels        uint8   [B, I, S, S, 3]  (data.encode="online") the 8-bit RGB images, encoded to latents
                                              inside the train step (training.online_encoding); zeros in
                                              empty slots
  image_positions    int32   [B, I]           position of the image's first token inside its document
  image_segment_ids  int32   [B, I]           document number of the image; 0 = empty slot
  image_first        bool    [B, I]           the image came before its caption (understanding example);
                                              training caps its noise level (t <= 500 by default)

A document is laid out (positions increasing) as
  caption first:  BOS caption... BOI <tokens_per_image image tokens> EOI EOS
  image first:    BOS BOI <image tokens> EOI caption... EOS
with the caption dropped (empty) for classifier-free guidance training.
"""
from __future__ import annotations

import jax
from typing import Any, Dict, Iterator, Sequence, Tuple

import numpy as np
from jax.sharding import Mesh

from lmfusion_jax.sharding import batch_sharding
from lmfusion_jax.errors import UserError

TEXT_KEYS = ("tokens", "text_positions", "text_segment_ids", "targets", "loss_mask")
IMAGE_KEYS = ("latents", "image_positions", "image_segment_ids", "image_first")
KEYS = TEXT_KEYS + IMAGE_KEYS


def image_key(batch: dict) -> str:
  """The field holding the images: "pixels" (encoded online) or "latents" (precomputed)."""
  return "pixels" if "pixels" in batch else "latents"


class BatchError(UserError):
  """A batch violates the packed-batch contract; the message names the field."""


def check_batch(batch: dict, text_len: int | None = None, image_slots: int | None = None) -> None:
  """Validates shapes and dtypes of a host (numpy) batch; raises BatchError naming the field."""
  img = image_key(batch)
  missing = [k for k in TEXT_KEYS + (img,) + IMAGE_KEYS[1:] if k not in batch]
  if missing:
    raise BatchError(f"batch is missing field(s) {missing}")
  b, t = np.shape(batch["tokens"])
  for k in TEXT_KEYS:
    if np.shape(batch[k]) != (b, t):
      raise BatchError(f"batch field {k!r} has shape {np.shape(batch[k])}, expected {(b, t)}")
  lat = np.shape(batch[img])
  if len(lat) != 5 or lat[0] != b:
    raise BatchError(f"batch field {img!r} has shape {lat}, expected [batch={b}, slots, H, W, C]")
  for k in IMAGE_KEYS[1:]:
    if np.shape(batch[k]) != lat[:2]:
      raise BatchError(f"batch field {k!r} has shape {np.shape(batch[k])}, expected {lat[:2]}")
  if text_len is not None and t != text_len:
    raise BatchError(f"batch field 'tokens' has length {t}, config says {text_len}")
  if image_slots is not None and lat[1] != image_slots:
    raise BatchError(f"batch field {img!r} has {lat[1]} image slots, config says {image_slots}")
  if img == "pixels" and np.asarray(batch[img]).dtype != np.uint8:
    raise BatchError(f"batch field 'pixels' is {np.asarray(batch[img]).dtype}, expected uint8")
  if img == "latents" and not np.all(np.isfinite(batch["latents"])):
    raise BatchError("batch field 'latents' contains NaN or Inf")


# Host-local numpy batches -> global jax Arrays sharded over ("data", "fsdp") on the batch dimension: every
# process passes its own local batch (global_batch_size / process_count rows); the global array's batch
# dimension is the concatenation over processes in process order.
def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """{field: numpy [local_batch, ...]} -> {field: jax.Array [global_batch, ...]} (batch-sharded)."""
  out = {}
  for name, value in host_batch.items():
    value = np.asarray(value)
    try:
      out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    except Exception as e:  # jax raises ValueError / TypeError / AssertionError for bad shapes
      raise ValueError(f"global_batch: field {name!r} with local shape {value.shape} cannot be sharded "
                       f"over mesh {dict(mesh.shape)} along ('data', 'fsdp'): {e}") from e
  return out


def padded_chunks(items: Sequence, size: int, pad=None, always_pad: bool = False) -> Iterator[Tuple[list, int]]:
  """Consecutive chunks of `size` items as (chunk, number of real items). When there is more than one chunk
  (or `always_pad`), the last one is filled up to `size` with `pad` (its own last item when `pad` is None),
  so one compiled program serves every chunk."""
  if size < 1:
    raise ValueError(f"chunk size {size} must be >= 1")
  items = list(items)
  for start in range(0, len(items), size):
    chunk = items[start:start + size]
    real = len(chunk)
    if real < size and (always_pad or len(items) > size):
      chunk = chunk + [chunk[-1] if pad is None else pad] * (size - real)
    yield chunk, real


def batch_spec(batch_size: int, text_len: int, image_slots: int, latent_shape,
               pixels: bool = False) -> Dict[str, Tuple[tuple, Any]]:
  """field -> (shape, dtype) of a packed batch (the table at the top of this module). With `pixels`, the
  images are uint8 "pixels" of shape `latent_shape` = (S, S, 3) instead of float32 "latents"."""
  b, t, i = int(batch_size), int(text_len), int(image_slots)
  images = {"pixels": ((b, i, *latent_shape), np.uint8)} if pixels else {
      "latents": ((b, i, *latent_shape), np.float32)}
  return {"tokens": ((b, t), np.int32), "text_positions": ((b, t), np.int32),
          "text_segment_ids": ((b, t), np.int32), "targets": ((b, t), np.int32),
          "loss_mask": ((b, t), np.float32), **images,
          "image_positions": ((b, i), np.int32), "image_segment_ids": ((b, i), np.int32),
          "image_first": ((b, i), np.bool_)}


def abstract_batch(batch_size: int, text_len: int, image_slots: int, latent_shape, mesh: Mesh,
                   pixels: bool = False) -> dict:
  """ShapeDtypeStructs of one global batch, sharded over ("data", "fsdp") on the batch dimension."""
  return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s)))
          for k, (s, d) in batch_spec(batch_size, text_len, image_slots, latent_shape, pixels).items()}
