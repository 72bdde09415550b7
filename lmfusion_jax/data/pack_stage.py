"""The packing stage of the Grain pipeline: a checkpointable IterDataset of packed rows.

It consumes `Document`s (or `SkippedRecord`s, which it counts) and yields rows (see `packing.py`).
It runs in the main process, after `mp_prefetch`, so its output does not depend on the number of
workers and its skip counters are visible to the caller.

Checkpointing: when a row is closed because the next document did not fit, that document is held
back for the following row. The iterator's state stores the parent's state from just BEFORE that
document was read (not the document itself), so restoring re-reads it: the state is small JSON, and a
restored iterator yields exactly the rows an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any

import grain

from lmfusion_jax.data.packing import RowPacker
from lmfusion_jax.data.sequences import SKIP_REASONS, BadRecordError, Document, SkippedRecord


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, text_len: int, image_slots: int, latent_shape,
               on_bad_record: str, pixels: bool = False):
    super().__init__(parent)
    self._packer = RowPacker(text_len, image_slots, latent_shape, pixels)
    self._on_bad_record = on_bad_record
    self._pending = None                # a Document held back for the next row
    self._state_before_pending = None   # parent state from before that document was read
    self._skipped = {r: 0 for r in SKIP_REASONS}
    self._rows = 0
    self._documents = 0

  def _too_big(self, doc: Document) -> bool:
    if self._packer.can_ever_fit(doc):
      return False
    if self._on_bad_record == "skip":
      self._skipped["too_long"] += 1
      return True
    raise BadRecordError(f"record id={doc.record_id!r}: document needs {doc.num_text} text slots and "
                         f"{doc.num_images} image slots; a row has {self._packer.text_len} and "
                         f"{self._packer.image_slots}")

  def _emit(self) -> dict:
    self._rows += 1
    return self._packer.emit()

  def __next__(self) -> dict:
    while True:
      if self._pending is not None:
        doc, self._pending, self._state_before_pending = self._pending, None, None
      else:
        state = self._parent.get_state()
        try:
          item = next(self._parent)
        except StopIteration:
          if self._packer.is_empty:
            raise
          return self._emit()
        if isinstance(item, SkippedRecord):
          self._skipped[item.reason] += 1
          continue
        doc = item
        if self._too_big(doc):
          continue
        if not self._packer.fits(doc):
          self._pending, self._state_before_pending = doc, state
          return self._emit()
      self._documents += 1
      self._packer.add(doc)

  def get_state(self) -> dict[str, Any]:
    # Called between rows: the current row is empty, at most one document is pending.
    if not self._packer.is_empty:
      raise RuntimeError("pack stage: get_state() called in the middle of a row")
    parent = self._state_before_pending if self._pending is not None else self._parent.get_state()
    return {"parent": parent, "skipped": dict(self._skipped), "rows": self._rows,
            "documents": self._documents}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._packer.emit()
    self._pending, self._state_before_pending = None, None
    self._skipped = {r: int(state["skipped"].get(r, 0)) for r in SKIP_REASONS}
    self._rows = int(state["rows"])
    self._documents = int(state["documents"])

  def counters(self) -> dict:
    """{"rows", "documents", "skipped": {reason: count}} so far."""
    return {"rows": self._rows, "documents": self._documents, "skipped": dict(self._skipped)}

  def __str__(self) -> str:
    return "PackIterator"


class PackIterDataset(grain.IterDataset):
  """Packs a stream of Documents / SkippedRecords into fixed-size rows (next-fit)."""

  def __init__(self, parent: grain.IterDataset, *, text_len: int, image_slots: int, latent_shape,
               on_bad_record: str = "error", pixels: bool = False):
    super().__init__(parent)
    self._args = (text_len, image_slots, tuple(latent_shape), on_bad_record, pixels)

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"PackIterDataset(text_len={self._args[0]}, image_slots={self._args[1]})"


def find_pack_iterator(iterator: grain.DatasetIterator) -> _PackIterator:
  """The pack stage inside a pipeline's iterator (to read its counters)."""
  todo = [iterator]
  while todo:
    it = todo.pop()
    if isinstance(it, _PackIterator):
      return it
    todo.extend(getattr(it, "_parents", ()))
  raise ValueError("iterator has no packing stage")
