"""Packing documents into fixed-size rows (pure numpy), and unpacking rows back (for checks and tests).

A row has `text_len` text slots and `image_slots` image slots (see `lmfusion_jax.data.batch`). Documents
are packed next-fit, in arrival order: a document goes into the current row if both its text tokens
and its images fit, otherwise the current row is closed and a new one started. Everything not used is
padding: token 0, segment id 0, loss_mask 0, zero latents (or zero pixels: `pixels=True`, data.encode="online").
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from lmfusion_jax.data.batch import batch_spec
from lmfusion_jax.data.sequences import Document


def empty_row(text_len: int, image_slots: int, latent_shape, pixels: bool = False) -> dict:
  """An all-padding row (no batch dimension)."""
  spec = batch_spec(1, text_len, image_slots, latent_shape, pixels)
  return {k: np.zeros(shape[1:], dtype) for k, (shape, dtype) in spec.items()}


def empty_batch(batch_size: int, text_len: int, image_slots: int, latent_shape, pixels: bool = False) -> dict:
  row = empty_row(text_len, image_slots, latent_shape, pixels)
  return {k: np.zeros((batch_size, *v.shape), v.dtype) for k, v in row.items()}


class RowPacker:
  """Builds one row at a time. `fits(doc)` / `add(doc)` / `emit()`; pure bookkeeping, no I/O."""

  def __init__(self, text_len: int, image_slots: int, latent_shape, pixels: bool = False):
    self.text_len, self.image_slots, self.latent_shape = text_len, image_slots, tuple(latent_shape)
    self.pixels = pixels
    self.image_key = "pixels" if pixels else "latents"
    self._reset()

  def _reset(self):
    self.row = empty_row(self.text_len, self.image_slots, self.latent_shape, self.pixels)
    self.text_used = 0
    self.images_used = 0
    self.num_documents = 0

  def can_ever_fit(self, doc: Document) -> bool:
    return doc.num_text <= self.text_len and doc.num_images <= self.image_slots

  def fits(self, doc: Document) -> bool:
    return (self.text_used + doc.num_text <= self.text_len and
            self.images_used + doc.num_images <= self.image_slots)

  @property
  def is_empty(self) -> bool:
    return self.num_documents == 0

  def add(self, doc: Document) -> None:
    if not self.fits(doc):
      raise ValueError(f"document {doc.record_id!r} does not fit the current row")
    seg = self.num_documents + 1
    t0, t1 = self.text_used, self.text_used + doc.num_text
    r = self.row
    r["tokens"][t0:t1] = doc.tokens
    r["text_positions"][t0:t1] = doc.text_positions
    r["text_segment_ids"][t0:t1] = seg
    r["targets"][t0:t1] = doc.targets
    r["loss_mask"][t0:t1] = doc.loss_mask
    i0, i1 = self.images_used, self.images_used + doc.num_images
    r[self.image_key][i0:i1] = doc.latents
    r["image_positions"][i0:i1] = doc.image_positions
    r["image_segment_ids"][i0:i1] = seg
    r["image_first"][i0:i1] = doc.image_first
    self.text_used, self.images_used, self.num_documents = t1, i1, seg

  def emit(self) -> dict:
    """Returns the current row and starts an empty one."""
    row = self.row
    self._reset()
    return row


def pack_documents(docs: Iterable[Document], text_len: int, image_slots: int,
                   latent_shape) -> Iterator[dict]:
  """Next-fit packing of a document stream into rows; the last partial row is emitted too."""
  packer = RowPacker(text_len, image_slots, latent_shape)
  for doc in docs:
    if not packer.can_ever_fit(doc):
      raise ValueError(f"record id={doc.record_id!r}: document needs {doc.num_text} text slots and "
                       f"{doc.num_images} images; a row has {text_len} and {image_slots}")
    if not packer.fits(doc):
      yield packer.emit()
    packer.add(doc)
  if not packer.is_empty:
    yield packer.emit()


def unpack_row(row: dict, tokens_per_image: int, image_token: int = -1) -> list:
  """Row -> list of documents in segment order, each as a dict:

    sequence: int64 [length] every position of the document: text token ids, `image_token` on the
              positions of an image (reconstructed from positions, not from array order)
    images:   float32 [n_images, H, W, C] in position order
    image_first: list of bools, targets / loss_mask: per text token in position order.
  """
  docs = []
  for seg in range(1, int(row["text_segment_ids"].max(initial=0)) + 1):
    t = np.nonzero(row["text_segment_ids"] == seg)[0]
    im = np.nonzero(row["image_segment_ids"] == seg)[0]
    pos = row["text_positions"][t]
    ipos = row["image_positions"][im]
    length = max(int(pos.max(initial=-1)) + 1, int((ipos + tokens_per_image).max(initial=0)))
    seq = np.full((length,), -2, np.int64)  # -2 = a position nobody filled (a bug)
    seq[pos] = row["tokens"][t]
    for p in ipos:
      seq[p:p + tokens_per_image] = image_token
    order = np.argsort(pos, kind="stable")
    iorder = np.argsort(ipos, kind="stable")
    docs.append({
        "sequence": seq,
        "images": row["latents"][im][iorder],
        "image_first": [bool(x) for x in row["image_first"][im][iorder]],
        "targets": row["targets"][t][order],
        "loss_mask": row["loss_mask"][t][order],
    })
  return docs
