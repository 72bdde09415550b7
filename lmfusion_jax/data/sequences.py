"""One record -> one document: order and caption-dropout draws, validation, and the token layout.

A record is `{"caption": str|bytes, "latent": float32[H, W, C], "id": str|bytes|int, "label": int?}`, or with
`SequenceSpec.pixels` (data.encode="online") `{"caption", "image": uint8[S, S, 3], "id"}`: the document then
carries the uint8 pixels where it would carry the latent (encoded in the train step).
A document is laid out exactly as `lmfusion_jax.data.batch` says (positions 0-based, P = tokens_per_image):

  caption first (n caption tokens):
    BOS c_1..c_n BOI <P image tokens> EOI EOS
    pos 0  1..n  n+1  n+2 .. n+1+P   n+2+P n+3+P          image_position = n+2
  image first:
    BOS BOI <P image tokens> EOI c_1..c_n      EOS
    pos 0  1   2 .. P+1      P+2 P+3..P+2+n   P+3+n       image_position = 2

Text slots hold the n + 4 text tokens in position order. `targets[i]` is the token at position
`pos_i + 1` when that is a text token of the same document, else 0 with loss_mask 0: so BOI (followed by
an image) and EOS (last) carry no target, while the token before BOI does predict BOI.

Both random choices (caption first with probability `caption_first_prob`, caption replaced by the empty
text with probability `caption_dropout`) come from `example_rng(seed, example_index)`, so a given example
(record x epoch) gets the same draws however the data is sharded over processes or workers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import numpy as np

from lmfusion_jax.errors import UserError

ON_BAD_RECORD = ("error", "skip")
ORDERS = ("random", "caption_first", "image_first")
# why a record was skipped; the keys of the skip counters
SKIP_REASONS = ("latent_shape", "latent_nonfinite", "empty_caption", "too_long")


class BadRecordError(UserError):
  """A record cannot become a document; the message names the record id and the reason."""


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """How documents are laid out and checked (a plain value, built from the data config)."""
  text_len: int                          # T: text slots per packed row
  image_slots: int                       # I: image slots per packed row
  tokens_per_image: int                  # P: positions one image occupies
  latent_shape: tuple                    # (H, W, C) every record's latent must have
  caption_first_prob: float = 0.8
  caption_dropout: float = 0.1
  order: str = "random"                  # "random" | "caption_first" | "image_first"
  on_bad_record: str = "error"           # "error" | "skip"
  pixels: bool = False                   # records hold uint8 "image" [S, S, 3] (latent_shape = (S, S, 3))

  @property
  def record_field(self) -> str:
    return "image" if self.pixels else "latent"

  @property
  def image_dtype(self):
    return np.uint8 if self.pixels else np.float32

  def __post_init__(self):
    if self.text_len < 4:
      raise ValueError(f"text_len={self.text_len}: a document needs at least 4 text slots (BOS BOI EOI EOS)")
    if self.image_slots < 1:
      raise ValueError(f"image_slots={self.image_slots}: every document has one image, need >= 1 slot")
    if self.tokens_per_image < 1:
      raise ValueError(f"tokens_per_image={self.tokens_per_image} must be >= 1")
    if len(self.latent_shape) != 3:
      raise ValueError(f"latent_shape={self.latent_shape} must be (H, W, C)")
    for name in ("caption_first_prob", "caption_dropout"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} is not a probability")
    if self.order not in ORDERS:
      raise ValueError(f"order={self.order!r} not in {ORDERS}")
    if self.on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={self.on_bad_record!r} not in {ON_BAD_RECORD}")


@dataclasses.dataclass
class Document:
  """One example laid out for packing (arrays in position order within each modality)."""
  record_id: str
  tokens: np.ndarray           # int32 [n_text]
  text_positions: np.ndarray   # int32 [n_text]
  targets: np.ndarray          # int32 [n_text]
  loss_mask: np.ndarray        # float32 [n_text]
  latents: np.ndarray          # float32 [n_images, H, W, C] (uint8 [n_images, S, S, 3] with spec.pixels)
  image_positions: np.ndarray  # int32 [n_images]
  image_first: np.ndarray      # bool [n_images]

  @property
  def num_text(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_images(self) -> int:
    return int(self.latents.shape[0])


@dataclasses.dataclass
class SkippedRecord:
  """Stands in for a bad record when on_bad_record='skip'; the packer counts it."""
  record_id: str
  reason: str  # one of SKIP_REASONS


def as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def record_id_of(record: dict, fallback) -> str:
  rid = record.get("id")
  return as_text(fallback if rid is None else (rid.item() if isinstance(rid, np.ndarray) else rid))


def example_rng(seed: int, example_index: int) -> np.random.Generator:
  """The per-example generator: a pure function of (seed, example index)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(example_index)])


def draw_choices(spec: SequenceSpec, rng: np.random.Generator) -> tuple:
  """(caption_first, drop_caption) for one example; both uniforms are always drawn."""
  u_order, u_drop = rng.random(2)
  if spec.order == "random":
    caption_first = bool(u_order < spec.caption_first_prob)
  else:
    caption_first = spec.order == "caption_first"
  return caption_first, bool(u_drop < spec.caption_dropout)


def record_problem(caption_ids: list, latent: np.ndarray, spec: SequenceSpec) -> Optional[tuple]:
  """(reason, detail) if the record is bad data, else None. Checks the SOURCE record (before dropout)."""
  if tuple(latent.shape) != tuple(spec.latent_shape):
    return "latent_shape", (f"{spec.record_field} has shape {tuple(latent.shape)}, expected "
                            f"{tuple(spec.latent_shape)}")
  if not spec.pixels and not np.all(np.isfinite(latent)):
    return "latent_nonfinite", "latent contains NaN or Inf"
  if len(caption_ids) == 0:
    return "empty_caption", "caption is empty"
  if len(caption_ids) + 4 > spec.text_len:
    return "too_long", (f"caption has {len(caption_ids)} tokens; with BOS/BOI/EOI/EOS it needs "
                        f"{len(caption_ids) + 4} text slots but a row has text_len={spec.text_len}")
  return None


def layout_document(record_id: str, caption_ids, latent: np.ndarray, *, caption_first: bool,
                    special: dict, tokens_per_image: int, dtype=np.float32) -> Document:
  """Lays out BOS/caption/BOI/image/EOI/EOS with positions and next-text-token targets."""
  caption_ids = [int(t) for t in caption_ids]
  n, p = len(caption_ids), tokens_per_image
  bos, eos, boi, eoi = special["bos"], special["eos"], special["boi"], special["eoi"]
  if caption_first:
    tokens = [bos] + caption_ids + [boi, eoi, eos]
    positions = list(range(n + 2)) + [n + 2 + p, n + 3 + p]
    image_position = n + 2
  else:
    tokens = [bos, boi, eoi] + caption_ids + [eos]
    positions = [0, 1] + list(range(p + 2, p + 4 + n))
    image_position = 2
  tokens = np.asarray(tokens, np.int32)
  positions = np.asarray(positions, np.int32)
  # next text token: text slot i+1 if it sits at position pos_i + 1 (else an image or the end follows)
  follows = np.zeros(len(tokens), bool)
  follows[:-1] = positions[1:] == positions[:-1] + 1
  targets = np.where(follows, np.roll(tokens, -1), 0).astype(np.int32)
  return Document(
      record_id=record_id, tokens=tokens, text_positions=positions, targets=targets,
      loss_mask=follows.astype(np.float32),
      latents=np.asarray(latent, dtype)[None],
      image_positions=np.asarray([image_position], np.int32),
      image_first=np.asarray([not caption_first], bool))


def build_document(record: dict, encode: Callable[[str], list], spec: SequenceSpec, special: dict, *,
                   seed: int, example_index: int) -> Union[Document, SkippedRecord]:
  """Record -> Document (or SkippedRecord / BadRecordError for bad data, per spec.on_bad_record)."""
  record_id = record_id_of(record, example_index)
  caption_ids = encode(as_text(record.get("caption", "")).strip())
  if spec.record_field not in record:
    raise BadRecordError(f"record id={record_id!r} has no {spec.record_field!r} field (fields: {sorted(record)})")
  latent = np.asarray(record[spec.record_field])
  problem = record_problem(caption_ids, latent, spec)
  if problem is not None:
    reason, detail = problem
    if spec.on_bad_record == "skip":
      return SkippedRecord(record_id, reason)
    raise BadRecordError(f"record id={record_id!r}: {detail} ({reason}); set on_bad_record='skip' to "
                         f"skip and count such records")
  caption_first, drop = draw_choices(spec, example_rng(seed, example_index))
  return layout_document(record_id, [] if drop else caption_ids, latent.astype(spec.image_dtype),
                         caption_first=caption_first, special=special,
                         tokens_per_image=spec.tokens_per_image, dtype=spec.image_dtype)


def text_document(record_id: str, ids, latent_shape=(1, 1, 1)) -> Document:
  """A text-only document (`ids` already holds BOS ... EOS): every token but the last predicts the next one."""
  tokens = np.asarray([int(t) for t in ids], np.int32)
  n = len(tokens)
  targets = np.zeros(n, np.int32)
  targets[:-1] = tokens[1:]
  loss_mask = np.zeros(n, np.float32)
  loss_mask[:-1] = 1.0
  return Document(record_id=record_id, tokens=tokens, text_positions=np.arange(n, dtype=np.int32),
                  targets=targets, loss_mask=loss_mask, latents=np.zeros((0, *latent_shape), np.float32),
                  image_positions=np.zeros((0,), np.int32), image_first=np.zeros((0,), bool))
