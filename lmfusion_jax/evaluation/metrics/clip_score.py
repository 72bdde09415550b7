"""CLIP score of (image, caption) pairs, as torchmetrics' `CLIPScore` (torchmetrics 1.9) computes it, on a converted
CLIP checkpoint (`lmfusion-jax convert-clip`).

torchmetrics (multimodal/clip_score.py and functional/multimodal/clip_score.py):
  per pair   100 * cos(E_image, E_text)  (the projected embeddings of HF get_image_features / get_text_features,
             each L2-normalized, dot product)
  result     max(mean over pairs, 0)     (the clamp is applied to the mean, not per pair; `per_pair` below is
             the unclamped torchmetrics per-sample score)
Its inputs go through HF's CLIPProcessor, reproduced here:
  images     uint8 RGB, each on its own: PIL bicubic resize of the SHORT side to `shortest_edge` (the long side
             int(shortest_edge * long / short)), center crop (zero-padded when smaller; top/left offsets
             (size - crop) // 2), x 1/255 (in float64, then float32), (x - mean) / std in float32. This is
             transformers' PIL backend (what transformers 5 uses without torchvision; older transformers'
             CLIPImageProcessor). With torchvision installed, transformers 5 defaults to its torchvision
             backend, whose bicubic resize (antialiased torch interpolate) differs slightly from PIL's.
  captions   the checkpoint's HF tokenizer (BOS ... EOS), padded to the longest caption, and cut (not
             truncated: the EOS is dropped too) to max_position_embeddings tokens, as torchmetrics does.
Captions are then padded to max_position_embeddings and the last batch to `batch_size` so each tower compiles
once; with the causal text mask, padding after the EOS changes nothing.
"""
from __future__ import annotations

import functools
import os
from typing import List, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lmfusion_jax.errors import UserError
from lmfusion_jax.models import clip as clip_lib
from lmfusion_jax.models.clip import ImageProcessorConfig

Images = Union[np.ndarray, Sequence[np.ndarray]]   # uint8 [N, H, W, 3], or N arrays [H_i, W_i, 3]


# --- preprocessing ------------------------------------------------------------------------------------------

def resize_output_size(height: int, width: int, proc: ImageProcessorConfig) -> Tuple[int, int]:
  """(height, width) after the resize (transformers' get_resize_output_image_size, default_to_square=False)."""
  if proc.resize_hw is not None:
    return proc.resize_hw
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = proc.shortest_edge, int(proc.shortest_edge * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, crop_hw: Tuple[int, int]) -> np.ndarray:
  """[H, W, C] -> [crop_h, crop_w, C] (transformers' center_crop: zero padding when the image is smaller)."""
  h, w = image.shape[:2]
  ch, cw = crop_hw
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
    return image[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
  tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)      # ceil
  padded[tp:tp + h, lp:lp + w] = image
  top, left = top + tp, left + lp
  return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def preprocess_image(image: np.ndarray, proc: ImageProcessorConfig) -> np.ndarray:
  """uint8 [H, W, 3] RGB -> float32 [crop_h, crop_w, 3], as HF CLIPImageProcessor (PIL backend)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise UserError(f"clip score: images must be uint8 [height, width, 3] RGB, got {image.dtype}{list(image.shape)}")
  x = image
  if proc.do_resize:
    h, w = resize_output_size(x.shape[0], x.shape[1], proc)
    x = np.asarray(Image.fromarray(x).resize((w, h), resample=proc.resample))
  if proc.do_center_crop:
    x = center_crop(x, proc.crop_hw)
  if proc.do_rescale:
    x = (x.astype(np.float64) * proc.rescale_factor).astype(np.float32)
  x = x.astype(np.float32)
  if proc.do_normalize:
    x = (x - np.asarray(proc.image_mean, np.float32)) / np.asarray(proc.image_std, np.float32)
  return x


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """captions -> (input_ids, attention_mask), int32 [N, max_length]: torchmetrics' ids (padded to the longest,
  cut to max_length), then padded with the tokenizer's pad id (mask 0) to max_length."""
  enc = tokenizer(list(captions), padding=True)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = np.full((len(captions), max_length), pad_id, np.int32)
  mask = np.zeros((len(captions), max_length), np.int32)
  for i, (row, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
    n = min(len(row), max_length)
    ids[i, :n], mask[i, :n] = row[:n], m[:n]
  return ids, mask


# --- the score ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _jitted(graphdef):
  """(image fn, text fn) for one model structure, compiled once per input shape."""
  image_fn = jax.jit(lambda state, px: clip_lib.image_embeds(nnx.merge(graphdef, state), px))
  text_fn = jax.jit(lambda state, ids, mask: clip_lib.text_embeds(nnx.merge(graphdef, state), ids, mask))
  return image_fn, text_fn


def _batched(fn, state, arrays: List[np.ndarray], batch_size: int) -> np.ndarray:
  """fn(state, *batch) over rows of `arrays`, every batch padded to `batch_size` rows -> [N, ...] float32."""
  n = arrays[0].shape[0]
  out = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    k = chunk[0].shape[0]
    chunk = [np.concatenate([c, np.zeros((batch_size - k,) + c.shape[1:], c.dtype)]) for c in chunk]
    out.append(np.asarray(fn(state, *[jnp.asarray(c) for c in chunk]), np.float32)[:k])
  return np.concatenate(out)


def clip_score(clip, images: Images, captions: Sequence[str], batch_size: int = 32) -> Tuple[float, np.ndarray]:
  """CLIP score of N (image, caption) pairs -> (max(mean, 0) as torchmetrics' CLIPScore, per-pair [N] float64
  100 * cos). `clip`: a loaded checkpoint (checkpoints.clip.load_clip) or its folder; images: uint8 RGB,
  [N, H, W, 3] or a list of [H_i, W_i, 3] (any sizes)."""
  from lmfusion_jax.checkpoints.clip import CLIPCheckpoint, load_clip
  if not isinstance(clip, CLIPCheckpoint):
    clip = load_clip(os.fspath(clip))
  images = list(images)
  captions = list(captions)
  if len(images) != len(captions):
    raise UserError(f"clip score: {len(images)} images but {len(captions)} captions (one caption per image)")
  if not images:
    raise UserError("clip score: no (image, caption) pairs")
  if batch_size < 1:
    raise UserError(f"clip score: batch_size={batch_size} must be >= 1")
  pixels = np.stack([preprocess_image(im, clip.image_processor) for im in images])   # [N, h, w, 3]
  ids, mask = tokenize(clip.tokenizer(), captions, clip.config.text.max_position_embeddings)
  graphdef, state = nnx.split(clip.model)
  image_fn, text_fn = _jitted(graphdef)
  img = _batched(image_fn, state, [pixels], batch_size).astype(np.float64)
  txt = _batched(text_fn, state, [ids, mask], batch_size).astype(np.float64)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  per_pair = 100.0 * np.sum(img * txt, axis=-1)
  return max(float(per_pair.mean()), 0.0), per_pair
