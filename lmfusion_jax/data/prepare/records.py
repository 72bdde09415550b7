"""One raw record -> pixels + caption, or the reason it is skipped.

Image: decoded with PIL (fully: a truncated file fails here), converted to 8-bit RGB with
`inference.image_files.to_8bit` (16-bit scaled, transparency composited onto white), center-cropped to a
square and resized to S x S with PIL's bicubic filter (antialiased when shrinking) -- the same steps, in the
same order, as build-data's `tfds_image_captions.load_image`, so the pixels (and latents) are bitwise those
build-data makes from the same file.
Caption: UTF-8, surrounding whitespace stripped.

Skip reasons (the keys of the summary's "skipped"):
  undecodable_image   PIL cannot open or fully decode the bytes (random bytes, a truncated JPEG/PNG, a
                      decompression bomb)
  too_small           the image's short side is below S/2 pixels (2 * min(w, h) < S): it would be upscaled
                      more than 2x
  missing_image       no image member / column value / file
  missing_caption     no caption (no .txt member, JSON without the --caption-field string, a null cell)
  empty_caption       the caption is empty or only whitespace
  non_utf8_caption    the caption bytes are not UTF-8
  outside_source      (folder) the record's file lies outside the source folder (absolute, `..`, symlink)
  duplicate           (folder) the file was listed before; the first record is kept
  nonfinite_latent    the VAE produced NaN / Inf for the image
  shard_error         an input shard could not be read to its end (truncated / corrupt tar or parquet);
                      counted once per shard, the records before the damage are kept
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np

REASONS = ("undecodable_image", "too_small", "missing_image", "missing_caption", "empty_caption",
           "non_utf8_caption", "outside_source", "duplicate", "nonfinite_latent", "shard_error")


def check_caption(caption) -> Tuple[Optional[str], Optional[str]]:
  """(caption text, None) or (None, skip reason)."""
  if caption is None:
    return None, "missing_caption"
  if isinstance(caption, (bytes, bytearray)):
    try:
      caption = bytes(caption).decode("utf-8")
    except UnicodeDecodeError:
      return None, "non_utf8_caption"
  text = str(caption).strip()
  if not text:
    return None, "empty_caption"
  return text, None


def square_pixels(data: bytes, size: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
  """Image bytes -> (uint8 [size, size, 3], None) or (None, skip reason)."""
  from PIL import Image
  from lmfusion_jax.inference.image_files import to_8bit
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception:  # pylint: disable=broad-except  # PIL raises many types for bad bytes
    return None, "undecodable_image"
  w, h = img.size
  if 2 * min(w, h) < size:
    return None, "too_small"
  try:
    img = to_8bit(img, "RGB")
  except Exception:  # pylint: disable=broad-except  # an exotic mode PIL cannot convert
    return None, "undecodable_image"
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
  return np.asarray(img, np.uint8), None


def to_model_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (`models.vae.to_model_range`, which the online encoding uses too)."""
  from lmfusion_jax.models.vae import to_model_range as model_range
  return model_range(np.asarray(pixels))


def png_bytes(pixels: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (lossless: decoding gives the pixels back exactly)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def process(raw, size: int) -> tuple:
  """A sources.Raw -> (id, caption, uint8 pixels, None) or (id, None, None, skip reason). A record is counted
  once, under the first reason found: the reader's, then the caption's, then the image's. Thread-safe (PIL
  decoding releases the GIL, so a thread pool decodes in parallel)."""
  if raw.reason:
    return raw.id, None, None, raw.reason
  caption, why = check_caption(raw.caption)
  if why:
    return raw.id, None, None, why
  pixels, why = square_pixels(raw.image, size)
  if why:
    return raw.id, None, None, why
  return raw.id, caption, pixels, None
