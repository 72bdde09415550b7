"""The ViT image encoder of Hugging Face `CLIPVisionModel` and `SiglipVisionModel` in Flax NNX (one module, two
variants), and the pre-LayerNorm transformer encoder both share with the CLIP text tower (models/clip.py).

  clip:    patch conv (no bias) -> [CLS | patches] + position embedding -> pre_layrnorm -> encoder layers
           pooled = post_layernorm(last_hidden_state[:, 0])            (last_hidden_state is NOT post-normed)
  siglip:  patch conv (with bias) -> patches + position embedding -> encoder layers
           last_hidden_state = post_layernorm(encoder output); pooled = attention-pooling head of it (optional,
           `use_head`: a learned probe attends over the tokens, then LayerNorm + MLP with a residual)

Every encoder layer is HF's CLIPEncoderLayer / SiglipEncoderLayer: x + attn(LN1(x)), then x + MLP(LN2(x)), with
biased q/k/v/out projections and fc1/fc2. Layer weights are stacked on a leading `layers` axis and the layers run
under `jax.lax.scan`, whose per-layer outputs are exactly HF's `output_hidden_states=True` tuple (after the
embeddings entry), so a VLM can take `hidden_states[-2]` (`vision_feature_layer=-2`).

Images come in NHWC float32, already preprocessed (resized, cropped, normalized); HF's NCHW `pixel_values` are
transposed at the boundary by the caller. Parameter tree (L layers, D hidden, H heads, K head_dim, F mlp, P patch):
  patch_embed [P, P, C, D]  patch_bias [D] (siglip)  class_embed [D] (clip)  pos_embed [positions, D]
  pre_norm/{scale, bias} (clip)   post_norm/{scale, bias}
  layers/{ln1_scale, ln1_bias, ln2_scale, ln2_bias [L, D], q/k/v [L, D, H, K], q_bias/k_bias/v_bias [L, H, K],
          o [L, H, K, D], o_bias [L, D], fc1 [L, D, F], fc1_bias [L, F], fc2 [L, F, D], fc2_bias [L, D]}
  head/{probe [D], q/k/v [D, H, K] (+ biases), o [H, K, D], o_bias [D], norm/{scale, bias}, fc1, fc1_bias, fc2,
        fc2_bias}  (siglip with use_head)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models.config import DTYPES, ConfigError
from lmfusion_jax.models.params import normal, ones, param, zeros

VARIANTS = ("clip", "siglip")


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions (the ones CLIP / SigLIP configs use).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


def check_encoder_fields(prefix: str, hidden_size: int, num_heads: int, hidden_act: str, param_dtype: str,
                         dtype: str) -> None:
  """The checks the vision and the text config share; messages name `prefix.field`."""
  if hidden_size % num_heads:
    raise ConfigError(f"{prefix}.hidden_size={hidden_size} is not divisible by {prefix}.num_heads={num_heads}")
  if hidden_act not in ACTIVATIONS:
    raise ConfigError(f"{prefix}.hidden_act={hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
  for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
    if value not in DTYPES:
      raise ConfigError(f"{prefix}.{name}={value!r}: expected one of {sorted(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Hyper-parameters of a CLIP or SigLIP vision tower (the fields of HF's CLIPVisionConfig / SiglipVisionConfig)."""
  variant: str = "clip"             # "clip" | "siglip"
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  layer_norm_eps: float = 1e-5      # CLIP 1e-5, SigLIP 1e-6
  hidden_act: str = "quick_gelu"    # CLIP quick_gelu, SigLIP gelu_pytorch_tanh
  use_head: bool = False            # SigLIP's attention-pooling head (HF `vision_use_head`)
  param_dtype: str = "float32"
  dtype: str = "float32"            # compute dtype (LayerNorm statistics and softmax always in fp32)

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ConfigError(f"vision.variant={self.variant!r}: expected one of {list(VARIANTS)}")
    if self.use_head and self.variant != "siglip":
      raise ConfigError("vision.use_head=True: only the siglip variant has an attention-pooling head")
    if not 0 < self.patch_size <= self.image_size:
      raise ConfigError(f"vision.patch_size={self.patch_size} must be in [1, image_size={self.image_size}]")
    check_encoder_fields("vision", self.hidden_size, self.num_heads, self.hidden_act, self.param_dtype, self.dtype)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid(self) -> int:
    """Patches along each side (HF's stride-P 'valid' convolution: a remainder of pixels is dropped)."""
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    """Tokens per image: the patches, plus CLS for CLIP."""
    return self.grid ** 2 + (1 if self.variant == "clip" else 0)

  def replace(self, **kw) -> "VisionConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, source: str = "vision config") -> "VisionConfig":
    """Inverse of `to_dict` (our own JSON); unknown fields raise naming them."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"{source}: unknown vision config field(s) {unknown}")
    try:
      return cls(**d)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from e


# --- pure functions ---------------------------------------------------------------------------------------

def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """torch.nn.LayerNorm over the last axis; statistics in fp32, result in x's dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def attention(xq: jax.Array, xkv: jax.Array, w: dict, mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention with biased projections: queries from xq [b, q, D], keys/values from xkv [b, k, D];
  w holds q/k/v [D, H, K], q_bias/k_bias/v_bias [H, K], o [H, K, D], o_bias [D]. mask: bool, broadcastable to
  [b, H, q, k], True = attend. Masked scores get the fp32 minimum (as HF's eager attention adds it)."""
  dt = xq.dtype

  def proj(x, name):
    return jnp.einsum("bsd,dhk->bshk", x, w[name].astype(dt)) + w[name + "_bias"].astype(dt)

  q, k, v = proj(xq, "q"), proj(xkv, "k"), proj(xkv, "v")
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  return jnp.einsum("bqhd,hdo->bqo", out, w["o"].astype(dt)) + w["o_bias"].astype(dt)


def mlp(x: jax.Array, w: dict, act) -> jax.Array:
  """fc2(act(fc1(x))): fc1 [D, F], fc2 [F, D] (+ biases)."""
  dt = x.dtype
  h = act(jnp.einsum("bsd,df->bsf", x, w["fc1"].astype(dt)) + w["fc1_bias"].astype(dt))
  return jnp.einsum("bsf,fd->bsd", h, w["fc2"].astype(dt)) + w["fc2_bias"].astype(dt)


def encoder_layer(x: jax.Array, w: dict, eps: float, act, mask: Optional[jax.Array] = None) -> jax.Array:
  """One pre-LN layer (HF CLIPEncoderLayer / SiglipEncoderLayer): x [b, s, D] -> [b, s, D]."""
  h = layer_norm(x, w["ln1_scale"], w["ln1_bias"], eps)
  x = x + attention(h, h, w, mask)
  h = layer_norm(x, w["ln2_scale"], w["ln2_bias"], eps)
  return x + mlp(h, w, act)


# --- modules ----------------------------------------------------------------------------------------------

def encoder_param_shapes(num_layers: int, d: int, heads: int, f: int) -> dict:
  """name -> (shape, logical names, init) of the stacked layer weights ([L, ...])."""
  k = d // heads
  vec = ((num_layers, d), ("layers", "norm"))
  shapes = {"ln1_scale": vec + ("ones",), "ln1_bias": vec + ("zeros",),
            "ln2_scale": vec + ("ones",), "ln2_bias": vec + ("zeros",)}
  for name in ("q", "k", "v"):
    shapes[name] = ((num_layers, d, heads, k), ("layers", "embed", "heads", "head_dim"), "normal")
    shapes[name + "_bias"] = ((num_layers, heads, k), ("layers", "heads", "head_dim"), "zeros")
  shapes["o"] = ((num_layers, heads, k, d), ("layers", "heads", "head_dim", "embed"), "normal")
  shapes["o_bias"] = vec + ("zeros",)
  shapes["fc1"] = ((num_layers, d, f), ("layers", "embed", "mlp"), "normal")
  shapes["fc1_bias"] = ((num_layers, f), ("layers", "mlp"), "zeros")
  shapes["fc2"] = ((num_layers, f, d), ("layers", "mlp", "embed"), "normal")
  shapes["fc2_bias"] = vec + ("zeros",)
  return shapes


LAYER_KEYS = tuple(encoder_param_shapes(1, 1, 1, 1))


def _init(rngs: nnx.Rngs, shape, dtype, init: str) -> jax.Array:
  if init == "ones":
    return ones(shape, dtype)
  if init == "zeros":
    return zeros(shape, dtype)
  return normal(rngs, shape, dtype)


class LayerNorm(nnx.Module):
  def __init__(self, d: int, dtype, eps: float):
    self.eps = eps
    self.scale = param(ones((d,), dtype), ("norm",))
    self.bias = param(zeros((d,), dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class EncoderStack(nnx.Module):
  """`num_layers` pre-LN transformer layers, weights stacked on a leading axis, run with jax.lax.scan.

  `cfg` is a VisionConfig or a models.clip.TextConfig (the same field names)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.eps = cfg.layer_norm_eps
    self.act_name = cfg.hidden_act
    dtype = DTYPES[cfg.param_dtype]
    for name, (shape, names, init) in encoder_param_shapes(cfg.num_layers, cfg.hidden_size, cfg.num_heads,
                                                           cfg.intermediate_size).items():
      setattr(self, name, param(_init(rngs, shape, dtype, init), names))

  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None):
    """x [b, s, D] -> (last layer's output [b, s, D], every layer's output [L, b, s, D])."""
    weights = {name: getattr(self, name)[...] for name in LAYER_KEYS}
    act = ACTIVATIONS[self.act_name]

    def body(h, w):
      h = encoder_layer(h, w, self.eps, act, mask)
      return h, h

    return jax.lax.scan(body, x, weights)


class AttentionPoolHead(nnx.Module):
  """SigLIP's MultiheadAttentionPoolingHead: a learned probe attends over the tokens (torch MultiheadAttention),
  then probe + MLP(LayerNorm(probe)); [b, s, D] -> [b, D]."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    d, h, k, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    dtype = DTYPES[cfg.param_dtype]
    self.eps = cfg.layer_norm_eps
    self.act_name = cfg.hidden_act
    self.probe = param(normal(rngs, (d,), dtype), ("norm",))
    for name in ("q", "k", "v"):
      setattr(self, name, param(normal(rngs, (d, h, k), dtype), ("embed", "heads", "head_dim")))
      setattr(self, name + "_bias", param(zeros((h, k), dtype), ("heads", "head_dim")))
    self.o = param(normal(rngs, (h, k, d), dtype), ("heads", "head_dim", "embed"))
    self.o_bias = param(zeros((d,), dtype), ("norm",))
    self.norm = LayerNorm(d, dtype, cfg.layer_norm_eps)
    self.fc1 = param(normal(rngs, (d, f), dtype), ("embed", "mlp"))
    self.fc1_bias = param(zeros((f,), dtype), ("mlp",))
    self.fc2 = param(normal(rngs, (f, d), dtype), ("mlp", "embed"))
    self.fc2_bias = param(zeros((d,), dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    w = {n: getattr(self, n)[...] for n in ("q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "o_bias",
                                            "fc1", "fc1_bias", "fc2", "fc2_bias")}
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))  # [b, 1, D]
    h = attention(probe, x, w)
    h = h + mlp(self.norm(h), w, ACTIVATIONS[self.act_name])
    return h[:, 0]


class VisionOutput(NamedTuple):
  hidden_states: jax.Array          # [L + 1, b, s, D]: the encoder input (embeddings; CLIP: after pre_layrnorm),
                                    # then every layer's output (HF's output_hidden_states tuple, stacked)
  last_hidden_state: jax.Array      # [b, s, D] (CLIP: the last layer's output; SigLIP: post_layernorm of it)
  pooled: Optional[jax.Array]       # [b, D] (CLIP: post_layernorm(CLS); SigLIP: the head; None without it)


class VisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p, dtype = cfg.hidden_size, cfg.patch_size, DTYPES[cfg.param_dtype]
    self.patch_embed = param(normal(rngs, (p, p, cfg.num_channels, d), dtype),
                             ("conv_h", "conv_w", "conv_in", "embed"))
    if cfg.variant == "siglip":
      self.patch_bias = param(zeros((d,), dtype), ("norm",))
    else:
      self.class_embed = param(normal(rngs, (d,), dtype), ("norm",))
      self.pre_norm = LayerNorm(d, dtype, cfg.layer_norm_eps)
    self.pos_embed = param(normal(rngs, (cfg.num_positions, d), dtype), ("patch", "embed"))
    self.layers = EncoderStack(cfg, rngs=rngs)
    self.post_norm = LayerNorm(d, dtype, cfg.layer_norm_eps)
    if cfg.use_head:
      self.head = AttentionPoolHead(cfg, rngs=rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """images [b, height, width, C] (NHWC, normalized) -> tokens [b, positions, D]: the stride-P patch
    convolution as one matmul over non-overlapping patches (row-major patch order, as HF's flatten(2))."""
    cfg = self.cfg
    b, h, w, c = images.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"vision tower: images are [batch, {h}, {w}, {c}], expected "
                       f"[batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC)")
    g, p = cfg.grid, cfg.patch_size
    x = images[:, :g * p, :g * p].astype(DTYPES[cfg.dtype])
    x = x.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p, p, c)
    x = jnp.einsum("bnijc,ijcd->bnd", x, self.patch_embed[...].astype(x.dtype))   # [b, patches, D]
    if cfg.variant == "siglip":
      x = x + self.patch_bias[...].astype(x.dtype)
    else:
      cls = jnp.broadcast_to(self.class_embed[...].astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    return x + self.pos_embed[...].astype(x.dtype)

  def __call__(self, images: jax.Array) -> VisionOutput:
    """images [batch, height, width, 3] float, normalized (NHWC) -> VisionOutput."""
    x = self.embed(images)
    if self.cfg.variant == "clip":
      x = self.pre_norm(x)
    last, per_layer = self.layers(x)
    hidden_states = jnp.concatenate([x[None], per_layer], axis=0)
    if self.cfg.variant == "clip":
      return VisionOutput(hidden_states, last, self.post_norm(last[:, 0]))
    last = self.post_norm(last)
    return VisionOutput(hidden_states, last, self.head(last) if self.cfg.use_head else None)
