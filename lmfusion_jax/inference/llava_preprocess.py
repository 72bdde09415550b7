"""A LLaVA model's image processor, reproduced in numpy / PIL: one uint8 RGB image -> the tiles its vision tower
sees, as HF's processors (PIL backend: what transformers 5 uses without torchvision) compute `pixel_values`.

  CLIPImageProcessor / LlavaImageProcessor   (LlavaImageProcessor with do_pad: padded to a square of the mean
                                             colour first) bicubic resize of the short side, center crop,
                                             x 1/255, (x - mean) / std: one tile
  SiglipImageProcessor                       bicubic resize to a fixed (height, width), x 1/255, normalize
  LlavaNextImageProcessor                    the best-fit pinpoint (models/llava.select_best_resolution); the image
                                             resized into it (aspect kept, sides ceil-ed) and zero-padded centred;
                                             cut into tile-sized squares row by row; plus the whole image resized
                                             to one tile (the base, first); each then as CLIPImageProcessor

The per-tile steps are evaluation/metrics/clip_score.preprocess_image (one implementation of CLIP's processor).
Output is NHWC float32 (HF's is NCHW: `pixel_values.transpose(0, 2, 3, 1)`); with the original (height, width) it
says how many image tokens the prompt must hold (models/llava.num_image_tokens, what LlavaProcessor /
LlavaNextProcessor expand `<image>` into).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numpy as np
from PIL import Image

from lmfusion_jax.errors import UserError
from lmfusion_jax.evaluation.metrics.clip_score import preprocess_image
from lmfusion_jax.inference.image_files import to_8bit
from lmfusion_jax.models.llava import LlavaConfig, num_image_tokens, select_best_resolution


class PixelInputs(NamedTuple):
  """One image, preprocessed."""
  tiles: np.ndarray                  # float32 [tiles, H, W, 3] (NHWC); NeXT: tile 0 is the base image
  image_hw: Tuple[int, int]          # the original (height, width): NeXT packing and the token count need it
  num_tokens: int                    # image tokens the prompt must hold for it


def as_rgb_uint8(image) -> np.ndarray:
  """A PIL image or an array -> uint8 [H, W, 3] (HF's do_convert_rgb: grey images become RGB, transparency is
  composited onto white: image_files.to_8bit, the one place files become pixels)."""
  if not isinstance(image, Image.Image):
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
      raise UserError(f"llava: images must be uint8 [height, width(, 1|3|4)], got {a.dtype}{list(a.shape)}")
    image = Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
  return np.asarray(to_8bit(image, "RGB"))


def pad_to_square(image: np.ndarray, mean) -> np.ndarray:
  """LlavaImageProcessor's do_pad: centred on a square of the mean colour (int(m * 255) per channel)."""
  h, w, c = image.shape
  if h == w:
    return image
  n = max(h, w)
  out = np.empty((n, n, c), image.dtype)
  out[...] = np.asarray([int(m * 255) for m in mean], image.dtype)
  top, left = (n - h) // 2, (n - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def _resize(image: np.ndarray, hw: Tuple[int, int], resample: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), resample=resample))


def fit_size(image_hw: Tuple[int, int], target_hw: Tuple[int, int]) -> Tuple[int, int]:
  """(height, width) of the image resized into target (aspect kept, the other side ceil-ed; HF
  get_patch_output_size)."""
  (h, w), (th, tw) = image_hw, target_hw
  if tw / w < th / h:
    return min(math.ceil(h * tw / w), th), tw
  return th, min(math.ceil(w * th / h), tw)


def anyres_tiles(image: np.ndarray, cfg: LlavaConfig) -> list:
  """uint8 [H, W, 3] -> [base, tile(0, 0), tile(0, 1), ...], uint8 (LlavaNextImageProcessor.get_image_patches)."""
  proc = cfg.processor
  resample = proc.resample
  side = proc.crop_hw[0]                                   # HF's patch size: crop_size's height, crop or not
  best = select_best_resolution(image.shape[:2], cfg.image_grid_pinpoints)
  nh, nw = fit_size(image.shape[:2], best)
  resized = _resize(image, (nh, nw), resample)
  top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
  padded = np.zeros(best + (3,), np.uint8)
  padded[top:top + nh, left:left + nw] = resized
  tiles = [padded[i:i + side, j:j + side] for i in range(0, best[0], side) for j in range(0, best[1], side)]
  base_hw = proc.resize_hw or (proc.shortest_edge, proc.shortest_edge)
  return [_resize(image, base_hw, resample)] + tiles


def preprocess(cfg: LlavaConfig, image) -> PixelInputs:
  """One image (PIL, or uint8 [H, W, 3]) -> PixelInputs for the model `cfg` describes."""
  image = as_rgb_uint8(image)
  hw = tuple(int(x) for x in image.shape[:2])
  if cfg.is_next:
    tiles = anyres_tiles(image, cfg)
  else:
    tiles = [pad_to_square(image, cfg.processor.image_mean) if cfg.pad_to_square else image]
  pixels = np.stack([preprocess_image(t, cfg.processor) for t in tiles]).astype(np.float32)
  return PixelInputs(pixels, hw, num_image_tokens(cfg, hw))


def expand_image_tokens(prompt, cfg: LlavaConfig, counts) -> list:
  """Token ids with each single image token replaced by as many as its image needs (`counts`, in order), as
  LlavaProcessor / LlavaNextProcessor expand `<image>`; UserError when the numbers of images differ."""
  prompt, counts = list(prompt), list(counts)
  where = [i for i, t in enumerate(prompt) if t == cfg.image_token_index]
  if len(where) != len(counts):
    raise UserError(f"the prompt holds {len(where)} image token(s) (id {cfg.image_token_index}) for "
                    f"{len(counts)} image(s); put one image token where each image goes")
  out, prev = [], 0
  for i, n in zip(where, counts):
    out += prompt[prev:i] + [cfg.image_token_index] * n
    prev = i + 1
  return out + prompt[prev:]
