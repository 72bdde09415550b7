"""Images out of the sampler: latents -> pixels (the VAE decoder, or the identity for pixel-space data such as
the digits), upscaling, contact sheets, and PNG files (written atomically through checkpoints.files).

  decode_to_images(latents, vae=None) -> uint8 [N, H', W', C']
  write_png / contact_sheet / label_rows (prompt text left of each row) / write_samples
"""
from __future__ import annotations

import io
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from lmfusion_jax.checkpoints.files import write_bytes
from lmfusion_jax.models.vae import jit_decode_latents, jit_encode_latents
from lmfusion_jax.errors import UserError


def to_float_images(latents, vae=None) -> np.ndarray:
  """Latents [N, h, w, c] -> float images in [-1, 1] (clipped) [N, H, W, C]: the VAE decoder, or the
  identity for pixel-space datasets (digits: the latent IS the image)."""
  x = jnp.asarray(latents, jnp.float32)
  if vae is not None:
    x = jit_decode_latents(vae)(x)
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise UserError(f"latents must be [N, H, W, C], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise UserError("decoded images contain NaN or Inf")
  return np.clip(x, -1.0, 1.0)


def float_to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> 0..255 (rounded)."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def decode_to_images(latents, vae=None) -> np.ndarray:
  """Latents [N, h, w, c] -> uint8 images [N, H, W, C] (VAE decode, or identity mapping [-1, 1] -> 0..255)."""
  return float_to_uint8(to_float_images(latents, vae))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of uint8 [N, H, W, C] by an integer factor (tiny digits become visible)."""
  if factor < 1:
    raise ValueError(f"upscale factor {factor} must be >= 1")
  return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def contact_sheet(images: np.ndarray, columns: Optional[int] = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 grid image [rows * (H + pad) + pad, cols * (W + pad) + pad, C]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
    raise ValueError(f"contact_sheet: expected uint8 [N, H, W, C] with N >= 1, got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    sheet[y:y + h, x:x + w] = img
  return sheet


def label_rows(sheet: np.ndarray, labels, row_height: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """A contact sheet uint8 [H, W, C] with rows of `row_height` pixels (+ `pad`) -> [H, M + W, C]: a left
  margin of width M holding each row's label, drawn in black with PIL's default font, vertically centred."""
  from PIL import Image, ImageDraw, ImageFont
  sheet = np.asarray(sheet)
  if sheet.ndim != 3 or sheet.dtype != np.uint8:
    raise ValueError(f"label_rows: expected a uint8 [H, W, C] sheet, got {sheet.dtype} {sheet.shape}")
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new("L", (1, 1)))
  boxes = [probe.textbbox((0, 0), str(t), font=font) for t in labels]     # (left, top, right, bottom)
  margin = max((b[2] for b in boxes), default=0) + 2 * max(pad, 4)
  canvas = Image.new("L", (margin, sheet.shape[0]), pad_value)
  draw = ImageDraw.Draw(canvas)
  for r, (text, box) in enumerate(zip(labels, boxes)):
    y = pad + r * (row_height + pad) + (row_height - (box[3] - box[1])) // 2 - box[1]
    draw.text((max(pad, 4), y), str(text), fill=0, font=font)
  margin_px = np.repeat(np.asarray(canvas, np.uint8)[:, :, None], sheet.shape[2], axis=2)   # [H, M, C]
  return np.concatenate([margin_px, sheet], axis=1)


def write_png(path, image: np.ndarray) -> str:
  """Writes uint8 [H, W, 1|3|4] (or [H, W]) as PNG, atomically."""
  from PIL import Image
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"write_png {path}: expected uint8 pixels, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"write_png {path}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  write_bytes(os.fspath(path), buf.getvalue())
  return os.fspath(path)


def write_samples(images: np.ndarray, out_dir, prefix: str = "sample", scale: int = 1,
                  columns: Optional[int] = None) -> dict:
  """Writes each uint8 image as OUT/prefix_00000.png and a contact sheet OUT/contact_sheet.png (both
  upscaled by `scale`). Returns {"images": [paths], "contact_sheet": path}."""
  images = upscale(np.asarray(images), scale)
  paths = [write_png(os.path.join(os.fspath(out_dir), f"{prefix}_{i:05d}.png"), img)
           for i, img in enumerate(images)]
  sheet = write_png(os.path.join(os.fspath(out_dir), "contact_sheet.png"), contact_sheet(images, columns))
  return {"images": paths, "contact_sheet": sheet}


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = (255, 255, 255, 255)   # transparent pixels are composited onto white


def to_8bit(img, mode: str):
  """Any PIL image -> a PIL image in `mode` ("L" grey or "RGB") with 8-bit values: the one place that
  turns files into pixels, for the sampler/captioner inputs and the image_captions dataset.

  16-bit grey ("I;16", "I;16B", ...) and 32-bit integer "I" (taken as 16-bit data, clipped to 0..65535)
  become round(v / 257) = round(v * 255 / 65535): the nearest 8-bit level, the exact inverse of the usual
  8 -> 16 bit expansion (k * 257). (PIL's own convert clips them at 255: all white.) 16-bit RGB(A) PNGs
  already arrive as 8-bit RGB(A) from PIL's decoder, which keeps the high byte (v >> 8, at most one level
  below v / 257). Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto
  white with PIL's `Image.alpha_composite`, never dropped.
  """
  from PIL import Image
  if mode not in ("L", "RGB"):
    raise ValueError(f"to_8bit: mode must be 'L' or 'RGB', got {mode!r}")
  if img.mode in SIXTEEN_BIT_MODES:
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)            # [H, W]
    img = Image.fromarray(((v + 128) // 257).astype(np.uint8), "L")    # round(v / 257); 257 is odd: no ties
  if img.mode in ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
  return img.convert(mode)


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """Image file -> float32 [size, size, channels] in [-1, 1] (8-bit via `to_8bit`, then area resize)."""
  from PIL import Image
  try:
    img = Image.open(path)
    img.load()
  except Exception as e:  # PIL raises several types for unreadable files
    raise UserError(f"--image {path}: cannot read the image ({type(e).__name__}: {e})") from e
  if channels not in (1, 3):
    raise UserError(f"--image {path}: the model has {channels} image channels; only 1 (grey) or 3 (RGB) "
                     f"can be read from an image file")
  img = to_8bit(img, "L" if channels == 1 else "RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BOX)
  x = np.asarray(img, np.float32) / 127.5 - 1.0
  return x[:, :, None] if x.ndim == 2 else x


def model_input_image(path, fcfg, vae=None) -> np.ndarray:
  """One image file as the model reads it: without a VAE the image IS the latent (pixel-space data such as the
  digits: the model's channel count, area-resized to the latent size, in [-1, 1]); with one, the VAE's input
  (its size and channels). A UserError names an unreadable file."""
  if vae is None:
    return load_image(path, fcfg.latent_size, fcfg.latent_channels)
  return load_image(path, fcfg.latent_size * vae.cfg.downsample_factor, vae.cfg.in_channels)


def latents_from_images(images: np.ndarray, vae=None) -> np.ndarray:
  """`model_input_image`s stacked [N, ...] -> clean latents [N, H, W, C] (one batched VAE encode, posterior
  mean; the identity without a VAE)."""
  return np.asarray(images) if vae is None else np.asarray(jit_encode_latents(vae)(jnp.asarray(images)))


def latents_from_files(paths, fcfg, vae=None) -> np.ndarray:
  """Image files -> clean latents [N, H, W, C] for the model (model_input_image, then latents_from_images)."""
  return latents_from_images(np.stack([model_input_image(f, fcfg, vae) for f in paths]), vae)
