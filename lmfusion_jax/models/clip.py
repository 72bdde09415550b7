"""CLIP (Hugging Face `CLIPModel`) in Flax NNX: the text tower, the vision tower (models/vision_tower.py, variant
"clip"), the two bias-free projections and `logit_scale`.

  text:   token + position embeddings -> causal pre-LN encoder layers (the vision tower's EncoderStack, with a
          causal and key-padding mask) -> final_layer_norm; pooled = the hidden state at the EOS position
  image_embeds(model, images) = visual_projection(vision pooled)     (HF get_image_features)
  text_embeds(model, ids, mask) = text_projection(text pooled)       (HF get_text_features)
Both are projected, NOT normalized. EOS position, as HF's CLIPTextTransformer: with the legacy
`eos_token_id == 2` of old configs, argmax(input_ids) (the EOS is the largest id of the original vocabulary);
otherwise the first position whose id is eos_token_id.

Parameter tree: text/{token_embed [V, D], pos_embed [max_positions, D], layers/... (as vision_tower),
final_norm/{scale, bias}}, vision/... (vision_tower.VisionTower), visual_projection [Dv, proj],
text_projection [Dt, proj], logit_scale [].

`ImageProcessorConfig` holds the image preprocessing the model was trained with (HF CLIPImageProcessor's
preprocessor_config.json); the preprocessing itself is evaluation/metrics/clip_score.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models.config import DTYPES, ConfigError
from lmfusion_jax.models.params import normal, param
from lmfusion_jax.models.vision_tower import EncoderStack, LayerNorm, VisionConfig, VisionTower, check_encoder_fields

LEGACY_EOS_TOKEN_ID = 2      # old CLIP configs: pooled at argmax(input_ids) (HF keeps that behaviour)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """HF CLIPTextConfig fields."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_layers: int = 12
  num_heads: int = 8
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  param_dtype: str = "float32"
  dtype: str = "float32"

  def __post_init__(self):
    check_encoder_fields("text", self.hidden_size, self.num_heads, self.hidden_act, self.param_dtype, self.dtype)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512

  def __post_init__(self):
    if self.vision.variant != "clip":
      raise ConfigError(f"clip.vision.variant={self.vision.variant!r}: a CLIP model has a 'clip' vision tower")

  def to_dict(self) -> dict:
    return {"text": dataclasses.asdict(self.text), "vision": self.vision.to_dict(),
            "projection_dim": self.projection_dim}

  @classmethod
  def from_dict(cls, d: dict, source: str = "clip config") -> "CLIPConfig":
    """Inverse of `to_dict` (our own JSON); unknown or missing fields raise naming them."""
    if set(d) != {"text", "vision", "projection_dim"}:
      raise ConfigError(f"{source}: expected the fields ['projection_dim', 'text', 'vision'], got {sorted(d)}")
    unknown = sorted(set(d["text"]) - {f.name for f in dataclasses.fields(TextConfig)})
    if unknown:
      raise ConfigError(f"{source}: unknown text config field(s) {unknown}")
    try:
      return cls(TextConfig(**d["text"]), VisionConfig.from_dict(d["vision"], source),
                 int(d["projection_dim"]))
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """HF CLIPImageProcessor settings: resize (the short side to `shortest_edge`, aspect kept; or to exactly
  `resize_hw`), center crop to `crop_hw`, x `rescale_factor`, (x - mean) / std."""
  shortest_edge: Optional[int] = 224
  resize_hw: Optional[Tuple[int, int]] = None
  resample: int = PIL_BICUBIC            # a PIL resampling filter id (HF `resample`)
  do_resize: bool = True
  do_center_crop: bool = True
  crop_hw: Tuple[int, int] = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: Tuple[float, ...] = OPENAI_CLIP_STD

  def __post_init__(self):
    for name in ("resize_hw", "crop_hw", "image_mean", "image_std"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    if self.do_resize and (self.shortest_edge is None) == (self.resize_hw is None):
      raise ConfigError("image_processor: exactly one of shortest_edge and resize_hw must be set")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ConfigError(f"image_processor: image_mean / image_std need 3 values, got {list(self.image_mean)} / "
                        f"{list(self.image_std)}")

  @classmethod
  def default_for(cls, image_size: int) -> "ImageProcessorConfig":
    """CLIPImageProcessor's defaults (bicubic shortest-edge resize, center crop, OpenAI mean/std) at the
    tower's image size (224 for the standard CLIP models)."""
    return cls(shortest_edge=image_size, crop_hw=(image_size, image_size))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, source: str = "image processor config") -> "ImageProcessorConfig":
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"{source}: unknown image processor field(s) {unknown}")
    return cls(**d)


# --- the text tower ---------------------------------------------------------------------------------------

def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """input_ids [b, s] -> [b] index of the pooled token (HF CLIPTextTransformer's rule)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTower(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = DTYPES[cfg.param_dtype]
    self.token_embed = param(normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype), ("vocab", "embed"))
    self.pos_embed = param(normal(rngs, (cfg.max_position_embeddings, cfg.hidden_size), dtype), ("length", "embed"))
    self.layers = EncoderStack(cfg, rngs=rngs)
    self.final_norm = LayerNorm(cfg.hidden_size, dtype, cfg.layer_norm_eps)

  def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None):
    """input_ids [b, s] int, attention_mask [b, s] (1 = token, 0 = padding; None = all tokens)
    -> (last_hidden_state [b, s, D] after final_layer_norm, pooled [b, D] at the EOS position)."""
    b, s = input_ids.shape
    if s > self.cfg.max_position_embeddings:
      raise ValueError(f"text tower: {s} tokens, more than max_position_embeddings="
                       f"{self.cfg.max_position_embeddings}")
    dt = DTYPES[self.cfg.dtype]
    x = jnp.take(self.token_embed[...], input_ids, axis=0).astype(dt) + self.pos_embed[...][:s].astype(dt)
    mask = jnp.tril(jnp.ones((s, s), bool))[None, None]                    # [1, 1, q, k] causal
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] != 0)                  # [b, 1, q, k] + key padding
    last, _ = self.layers(x, mask)
    last = self.final_norm(last)
    pooled = last[jnp.arange(b), eos_positions(input_ids, self.cfg.eos_token_id)]
    return last, pooled


class CLIP(nnx.Module):
  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = DTYPES[cfg.vision.param_dtype]
    self.text = TextTower(cfg.text, rngs=rngs)
    self.vision = VisionTower(cfg.vision, rngs=rngs)
    self.visual_projection = param(normal(rngs, (cfg.vision.hidden_size, cfg.projection_dim), dtype),
                                   ("embed", "mlp"))
    self.text_projection = param(normal(rngs, (cfg.text.hidden_size, cfg.projection_dim), dtype), ("embed", "mlp"))
    self.logit_scale = param(jnp.asarray(math.log(1 / 0.07), dtype), ())


def image_embeds(model: CLIP, images: jax.Array) -> jax.Array:
  """images [batch, height, width, 3] (NHWC, preprocessed) -> [batch, projection_dim] (HF get_image_features;
  not normalized)."""
  pooled = model.vision(images).pooled
  return jnp.einsum("bd,dp->bp", pooled, model.visual_projection[...].astype(pooled.dtype))


def text_embeds(model: CLIP, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
  """input_ids [batch, seq], attention_mask [batch, seq] -> [batch, projection_dim] (HF get_text_features;
  not normalized)."""
  _, pooled = model.text(input_ids, attention_mask)
  return jnp.einsum("bd,dp->bp", pooled, model.text_projection[...].astype(pooled.dtype))
