"""The frozen understanding side of LLaVA / LLaVA-NeXT (HF `LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`) in Flax NNX: vision tower -> chosen layer -> projector -> the prompt's image
tokens; the text side is our Llama (models/llama.py) on the embedded sequence.

  features(tile)   hidden_states[vision_feature_layer] of the tower ([L + 1, ...], see models/vision_tower.py),
                   CLS dropped with strategy "default" (HF drops token 0 whatever the tower), projector
                   linear_2(act(linear_1(x))) -> [tokens_per_tile, D]
  LLaVA            one tile per image: its features are the image's rows
  LLaVA-NeXT       tile 0 = the whole image resized (base), tiles 1.. = the best-fit pinpoint grid (rows x cols):
                   base rows first, then the tiles' patch grids laid out as one [rows*g, cols*g] map, unpadded to
                   the image's aspect ratio, with `image_newline` appended to every map row
                   (HF LlavaNextModel.pack_image_features, "spatial_unpad")
  placement        the image rows replace the embeddings of the image tokens, in order (HF masked_scatter)

Sizes a NeXT image takes (select_best_resolution, anyres_grid, unpadded_box, num_image_tokens) are host
functions of the original (height, width), shared with the preprocessing (inference/llava_preprocess.py), so the
prompt holds exactly as many image tokens as packing produces rows.

Parameter tree of `LlavaVision` (Dv tower width, D text width):
  tower/...                                    models/vision_tower.VisionTower
  projector/{linear_1 [Dv, D], linear_1_bias [D], linear_2 [D, D], linear_2_bias [D]}   (biases optional)
  image_newline [D]                            (NeXT only)
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmfusion_jax.errors import UserError
from lmfusion_jax.models.clip import ImageProcessorConfig
from lmfusion_jax.models.config import DTYPES, ConfigError, LlamaConfig
from lmfusion_jax.models.params import normal, param, zeros
from lmfusion_jax.models.vision_tower import ACTIVATIONS, VisionConfig, VisionTower

STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """A LLaVA / LLaVA-NeXT model: its Llama, its vision tower, how image features are made, and the image
  processor it was trained with (HF config.json + preprocessor_config.json)."""
  text: LlamaConfig
  vision: VisionConfig
  processor: ImageProcessorConfig                 # resize / crop / rescale / normalize of one tile
  pad_to_square: bool = False                     # LlavaImageProcessor do_pad: pad to a square (mean colour) first
  image_grid_pinpoints: Tuple[Tuple[int, int], ...] = ()   # NeXT (height, width) grids; () = plain LLaVA
  vision_feature_layer: int = -2                  # index into the tower's L + 1 hidden states
  vision_feature_select_strategy: str = "default"   # "default" drops token 0 (CLS), "full" keeps all
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  image_token_index: int = 32000
  hf_layout: str = "saved"                        # tensor names read (convert/hf_llava.py LAYOUTS)

  def __post_init__(self):
    object.__setattr__(self, "image_grid_pinpoints", tuple(tuple(int(x) for x in p)
                                                            for p in self.image_grid_pinpoints))
    layers = self.vision.num_layers
    if not isinstance(self.vision_feature_layer, int) or isinstance(self.vision_feature_layer, bool):
      raise ConfigError(f"vision_feature_layer={self.vision_feature_layer!r}: only a single layer (an int) is "
                        f"supported, not a list of layers")
    if not -(layers + 1) <= self.vision_feature_layer <= layers:
      raise ConfigError(f"vision_feature_layer={self.vision_feature_layer}: the tower has {layers + 1} hidden "
                        f"states (index in [{-(layers + 1)}, {layers}])")
    if self.vision_feature_select_strategy not in STRATEGIES:
      raise ConfigError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: expected one "
                        f"of {list(STRATEGIES)}")
    if self.projector_hidden_act not in ACTIVATIONS:
      raise ConfigError(f"projector_hidden_act={self.projector_hidden_act!r}: expected one of "
                        f"{sorted(ACTIVATIONS)}")
    if not 0 <= self.image_token_index < self.text.vocab_size:
      raise ConfigError(f"image_token_index={self.image_token_index} is outside the text vocabulary "
                        f"[0, {self.text.vocab_size})")
    size = self.vision.image_size
    for h, w in self.image_grid_pinpoints:
      if h <= 0 or w <= 0 or h % size or w % size:
        raise ConfigError(f"image_grid_pinpoints: [{h}, {w}] is not a positive multiple of the tower's "
                          f"image_size={size}")
    if self.is_next and self.tokens_per_tile != self.vision.grid ** 2:
      raise ConfigError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: a NeXT tile "
                        f"must give grid^2={self.vision.grid ** 2} features to be laid out as a grid, this "
                        f"{self.vision.variant} tower gives {self.tokens_per_tile}")

  @property
  def is_next(self) -> bool:
    return bool(self.image_grid_pinpoints)

  @property
  def tokens_per_tile(self) -> int:
    """Feature rows one tile gives (the tower's tokens, less CLS / token 0 with strategy "default")."""
    return self.vision.num_positions - (1 if self.vision_feature_select_strategy == "default" else 0)

  def replace(self, **kw) -> "LlavaConfig":
    return dataclasses.replace(self, **kw)


# --- NeXT sizes (host functions of the original image size) ----------------------------------------------

def select_best_resolution(image_hw: Tuple[int, int], pinpoints: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
  """The (height, width) pinpoint keeping the most of the image's pixels when fitted inside it (aspect kept),
  ties broken by the least wasted area (HF select_best_resolution; first wins on a full tie)."""
  h, w = image_hw
  best, best_eff, best_waste = None, 0, float("inf")
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    eff = min(int(w * scale) * int(h * scale), w * h)
    waste = ph * pw - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (ph, pw), eff, waste
  return best


def anyres_grid(cfg: LlavaConfig, image_hw: Tuple[int, int]) -> Tuple[int, int]:
  """(rows, cols) of tiles a NeXT image is cut into."""
  ph, pw = select_best_resolution(image_hw, cfg.image_grid_pinpoints)
  return ph // cfg.vision.image_size, pw // cfg.vision.image_size


def unpadded_box(image_hw: Tuple[int, int], map_hw: Tuple[int, int]) -> Tuple[int, int, int, int]:
  """(top, bottom, left, right) of the part of a [map_h, map_w] feature map the image covers after its
  aspect-keeping resize and centred padding (HF unpad_image / LlavaNextProcessor._get_unpadded_features)."""
  h, w = image_hw
  mh, mw = map_hw
  if w / h > mw / mh:
    pad = (mh - int(round(h * (mw / w), 7))) // 2
    return pad, mh - pad, 0, mw
  pad = (mw - int(round(w * (mh / h), 7))) // 2
  return 0, mh, pad, mw - pad


def num_image_tokens(cfg: LlavaConfig, image_hw: Tuple[int, int]) -> int:
  """How many image tokens the prompt must hold for one image of original size (height, width)."""
  if not cfg.is_next:
    return cfg.tokens_per_tile
  rows, cols = anyres_grid(cfg, image_hw)
  g = cfg.vision.grid
  top, bottom, left, right = unpadded_box(image_hw, (rows * g, cols * g))
  return cfg.tokens_per_tile + (bottom - top) * (right - left + 1)


def num_tiles(cfg: LlavaConfig, image_hw: Tuple[int, int]) -> int:
  """Tiles the tower sees for one image: 1 (LLaVA), or the base image + rows * cols (NeXT)."""
  if not cfg.is_next:
    return 1
  rows, cols = anyres_grid(cfg, image_hw)
  return 1 + rows * cols


# --- modules ----------------------------------------------------------------------------------------------

class Projector(nnx.Module):
  """HF LlavaMultiModalProjector: linear_2(act(linear_1(x))), [.., Dv] -> [.., D]."""

  def __init__(self, dv: int, d: int, act: str, bias: bool, dtype, *, rngs: nnx.Rngs):
    self.act_name = act
    self.linear_1 = param(normal(rngs, (dv, d), dtype), ("embed", "mlp"))
    self.linear_2 = param(normal(rngs, (d, d), dtype), ("mlp", "embed"))
    if bias:
      self.linear_1_bias = param(zeros((d,), dtype), ("mlp",))
      self.linear_2_bias = param(zeros((d,), dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = jnp.einsum("...v,vd->...d", x, self.linear_1[...].astype(dt))
    if hasattr(self, "linear_1_bias"):
      h = h + self.linear_1_bias[...].astype(dt)
    h = jnp.einsum("...d,de->...e", ACTIVATIONS[self.act_name](h), self.linear_2[...].astype(dt))
    if hasattr(self, "linear_2_bias"):
      h = h + self.linear_2_bias[...].astype(dt)
    return h


class LlavaVision(nnx.Module):
  """The vision side of a LLaVA model: tower, projector and (NeXT) image_newline."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = DTYPES[cfg.vision.param_dtype]
    self.tower = VisionTower(cfg.vision, rngs=rngs)
    self.projector = Projector(cfg.vision.hidden_size, cfg.text.dim, cfg.projector_hidden_act, cfg.projector_bias,
                               dtype, rngs=rngs)
    if cfg.is_next:
      self.image_newline = param(normal(rngs, (cfg.text.dim,), dtype), ("norm",))

  def __call__(self, tiles: jax.Array) -> jax.Array:
    """tiles [n, H, W, C] (NHWC, preprocessed) -> projected features [n, tokens_per_tile, D]."""
    cfg = self.cfg
    hidden = self.tower(tiles).hidden_states[cfg.vision_feature_layer]           # [n, positions, Dv]
    if cfg.vision_feature_select_strategy == "default":
      hidden = hidden[:, 1:]
    return self.projector(hidden)


# --- packing and placement (pure) -------------------------------------------------------------------------

def pack_next(cfg: LlavaConfig, features: jax.Array, image_hw: Tuple[int, int],
              newline: jax.Array) -> jax.Array:
  """One NeXT image's tile features [1 + rows*cols, g*g, D] (base tile first) -> its rows [N, D]:
  base rows, then the unpadded [rows*g, cols*g] map with `newline` [D] after every map row."""
  rows, cols = anyres_grid(cfg, image_hw)
  g, d = cfg.vision.grid, features.shape[-1]
  if features.shape[0] != 1 + rows * cols:
    raise ValueError(f"pack_next: {features.shape[0]} tiles for an image of size {tuple(image_hw)}, expected "
                     f"1 + {rows}x{cols}")
  grid = features[1:].reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
  top, bottom, left, right = unpadded_box(image_hw, (rows * g, cols * g))
  grid = grid[top:bottom, left:right]                                            # [h', w', D]
  nl = jnp.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, d))
  grid = jnp.concatenate([grid, nl], axis=1).reshape(-1, d)                      # [h' * (w' + 1), D]
  return jnp.concatenate([features[0], grid], axis=0)


def image_rows(cfg: LlavaConfig, features: jax.Array, image_hw: Tuple[int, int],
               newline: Optional[jax.Array] = None) -> jax.Array:
  """One image's tile features [tiles, tokens_per_tile, D] (LlavaVision's output) -> the rows its image
  tokens take [N, D] (N = num_image_tokens(cfg, image_hw)); NeXT needs `newline` [D]."""
  if not cfg.is_next:
    return features.reshape(-1, features.shape[-1])
  return pack_next(cfg, features, image_hw, newline)


def check_image_token_count(tokens, image_token_index: int, num_rows: int) -> None:
  """UserError naming both counts unless the prompts hold exactly `num_rows` image tokens."""
  n = int(np.sum(np.asarray(tokens) == image_token_index))
  if n != num_rows:
    raise UserError(f"the prompt(s) hold {n} image token(s) (id {image_token_index}) but the image(s) give "
                    f"{num_rows} feature row(s); the prompt needs one image token per feature row")


def place_image_features(embeds: jax.Array, tokens: jax.Array, features: jax.Array,
                         image_token_index: int) -> jax.Array:
  """embeds [b, s, D] with the image tokens' rows replaced by features [N, D], in row-major order of
  (batch, position) (HF masked_scatter). With concrete tokens the count is checked (UserError); under jit
  the caller must have checked it."""
  if not isinstance(tokens, jax.core.Tracer):
    check_image_token_count(tokens, image_token_index, features.shape[0])
  if features.shape[0] == 0:
    return embeds
  mask = (tokens == image_token_index)                                          # [b, s]
  order = jnp.cumsum(mask.reshape(-1)) - 1                                       # k-th image token -> row k
  rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0)
  rows = rows.reshape(embeds.shape).astype(embeds.dtype)
  return jnp.where(mask[..., None], rows, embeds)
