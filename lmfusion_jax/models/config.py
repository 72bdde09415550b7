"""Model hyper-parameters as frozen dataclasses (hashable, so they can be static jit arguments).

`LlamaConfig` describes the text tower and maps to/from a Hugging Face `config.json`.
`FusionConfig` adds what LMFusion needs on top: separation mode, image in/out modules, BOI/EOI ids.
Run-level knobs live in ml_collections configs under configs/; `from_config_dict` builds these from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Optional

import jax.numpy as jnp

from lmfusion_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# what a layer keeps for the backward pass (models/decoder.py: remat_policy has the save_* / offload_* ones)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_qkv_proj",
                  "save_qkv_attn", "save_out_proj", "offload_qkv_attn")
# "xla": plain XLA (runs anywhere); "flash": the Pallas TPU kernel (models/flash_attention.py);
# "flash_interpret": the same kernel interpreted (CPU; tests).
ATTENTION_IMPLS = ("xla", "flash", "flash_interpret")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ConfigError(UserError):
  """A configuration field has an unusable value; the message names the field."""


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: Optional[int] = None) -> None:
  """Raises ConfigError naming `name` unless `value` is an integer (not a bool) >= `minimum`."""
  if not _is_int(value):
    raise ConfigError(f"{name}={value!r}: expected an integer, got {type(value).__name__}")
  if minimum is not None and value < minimum:
    raise ConfigError(f"{name}={value}: must be >= {minimum}")


def check_float(name: str, value, minimum: Optional[float] = None, strict: bool = False) -> None:
  """Raises ConfigError naming `name` unless `value` is a finite number >= (or > with `strict`) `minimum`."""
  if not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
    raise ConfigError(f"{name}={value!r}: expected a number, got {type(value).__name__}")
  if not math.isfinite(value):
    raise ConfigError(f"{name}={value}: must be finite")
  if minimum is not None and (value <= minimum if strict else value < minimum):
    raise ConfigError(f"{name}={value}: must be {'>' if strict else '>='} {minimum}")


def _check_choice(name: str, value, choices) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ConfigError(f"{name}={value!r}: expected one of {sorted(choices) if isinstance(choices, dict) else choices}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1/3.2 "llama3" RoPE frequency scaling."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      check_float(f"model.rope_scaling.{name}", getattr(self, name), minimum=0.0, strict=True)
    check_int("model.rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
              minimum=1)
    if self.high_freq_factor <= self.low_freq_factor:
      raise ConfigError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must be greater than "
                        f"model.rope_scaling.low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 128256
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 8
  head_dim: int = 128
  ffn_dim: int = 14336
  norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: Optional[RopeScaling] = None
  tie_embeddings: bool = False
  max_seq_len: int = 8192
  bos_id: int = 128000
  eos_id: int = 128001
  # Numerics and compilation.
  param_dtype: str = "float32"
  dtype: str = "float32"          # compute dtype
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "xla"     # see ATTENTION_IMPLS
  # flash only: the expected fraction of (q block, k block) tiles the block-sparse kernel computes, for its cost
  # estimate inside a jitted step (the token info is traced there). 1.0 = every tile (an upper bound); it never
  # changes what is computed, only what the compiler's cost model (and `plan`) is told.
  attention_tile_fraction: float = 1.0

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
      check_int(f"model.{name}", getattr(self, name), minimum=1)
    check_int("model.bos_id", self.bos_id)
    check_int("model.eos_id", self.eos_id)
    check_float("model.norm_eps", self.norm_eps, minimum=0.0, strict=True)
    check_float("model.rope_theta", self.rope_theta, minimum=0.0, strict=True)
    for name in ("tie_embeddings", "scan_layers"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected true or false")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ConfigError(f"model.rope_scaling={self.rope_scaling!r}: expected None or the llama3 scaling fields")
    _check_choice("model.param_dtype", self.param_dtype, DTYPES)
    _check_choice("model.dtype", self.dtype, DTYPES)
    _check_choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_float("model.attention_tile_fraction", self.attention_tile_fraction, minimum=0.0)
    if self.attention_tile_fraction > 1.0:
      raise ConfigError(f"model.attention_tile_fraction={self.attention_tile_fraction}: a fraction of tiles, <= 1")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count of the text tower (exact)."""
    d, f, l = self.dim, self.ffn_dim, self.n_layers
    attn = d * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
    per_layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return l * per_layer + emb + d

  # --- Hugging Face config.json ------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "LlamaConfig":
    """Builds a config from a HF LlamaConfig dict; a missing, mistyped or out-of-range field (or an
    unknown rope type) raises ConfigError naming `source` and the field."""
    if not isinstance(hf, dict):
      raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")

    def need(key):
      if key not in hf:
        raise ConfigError(f"{source}: missing field {key!r}")
      return hf[key]

    def as_int(field, value, minimum=None):
      if isinstance(value, float) and value.is_integer():
        value = int(value)
      if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        want = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"{source}: field {field!r}={value!r}: expected {want}")
      return value

    def as_float(field, value):
      if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
          or value <= 0):
        raise ConfigError(f"{source}: field {field!r}={value!r}: expected a finite number > 0")
      return float(value)

    def optional(key):
      return hf.get(key) if hf.get(key) is not None else None

    scaling = None
    rs = hf.get("rope_scaling") or None
    # transformers 5 moved rope settings into "rope_parameters"; accept both spellings.
    rp = hf.get("rope_parameters") or None
    rs_field = "rope_scaling"
    if rp is not None and not isinstance(rp, dict):
      raise ConfigError(f"{source}: field 'rope_parameters'={rp!r}: expected an object")
    if rs is None and rp is not None and rp.get("rope_type", "default") != "default":
      rs, rs_field = rp, "rope_parameters"
    rope_theta = as_float("rope_theta", hf.get("rope_theta", (rp or {}).get("rope_theta", 10000.0)))
    if rs is not None:
      if not isinstance(rs, dict):
        raise ConfigError(f"{source}: field {rs_field!r}={rs!r}: expected an object")
      rtype = rs.get("rope_type", rs.get("type"))
      if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope_scaling type {rtype!r} in field {rs_field!r} "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
      if rtype == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if rs.get(k) is None]
        if missing:
          raise ConfigError(f"{source}: field {rs_field!r} of type 'llama3' is missing "
                            f"{', '.join(f'{rs_field}.{k}' for k in missing)}")
        low = as_float(f"{rs_field}.low_freq_factor", rs["low_freq_factor"])
        high = as_float(f"{rs_field}.high_freq_factor", rs["high_freq_factor"])
        if high <= low:
          raise ConfigError(f"{source}: field '{rs_field}.high_freq_factor'={high} must be greater than "
                            f"'{rs_field}.low_freq_factor'={low}")
        scaling = RopeScaling(factor=as_float(f"{rs_field}.factor", rs["factor"]), low_freq_factor=low,
                              high_freq_factor=high,
                              original_max_position_embeddings=as_int(
                                  f"{rs_field}.original_max_position_embeddings",
                                  rs["original_max_position_embeddings"], minimum=1))
    n_heads = as_int("num_attention_heads", need("num_attention_heads"), minimum=1)
    dim = as_int("hidden_size", need("hidden_size"), minimum=1)
    kv = optional("num_key_value_heads")
    n_kv_heads = n_heads if kv is None else as_int("num_key_value_heads", kv, minimum=1)
    if n_heads % n_kv_heads:
      raise ConfigError(f"{source}: field 'num_attention_heads'={n_heads} is not a multiple of "
                        f"'num_key_value_heads'={n_kv_heads}")
    hd = optional("head_dim")
    if hd is None:
      if dim % n_heads:
        raise ConfigError(f"{source}: field 'hidden_size'={dim} is not a multiple of "
                          f"'num_attention_heads'={n_heads} and there is no 'head_dim'")
      head_dim = dim // n_heads
    else:
      head_dim = as_int("head_dim", hd, minimum=1)
    if head_dim % 2:
      raise ConfigError(f"{source}: head_dim={head_dim} must be even for RoPE")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError(f"{source}: attention_bias/mlp_bias=true is not a Llama-3 layout and is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act={hf.get('hidden_act')!r}; only 'silu' is supported")
    bos = hf.get("bos_token_id", 1)
    eos = hf.get("eos_token_id", 2)
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    kw = dict(
        vocab_size=as_int("vocab_size", need("vocab_size"), minimum=1), dim=dim,
        n_layers=as_int("num_hidden_layers", need("num_hidden_layers"), minimum=1),
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        ffn_dim=as_int("intermediate_size", need("intermediate_size"), minimum=1),
        norm_eps=as_float("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=as_int("max_position_embeddings", hf.get("max_position_embeddings", 8192), minimum=1),
        bos_id=as_int("bos_token_id", bos if bos is not None else 0),
        eos_id=as_int("eos_token_id", eos if eos is not None else 0))
    kw.update(overrides)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from e

  @classmethod
  def from_hf_file(cls, path, **overrides) -> "LlamaConfig":
    from etils import epath
    p = epath.Path(path)
    try:
      hf = json.loads(p.read_text())
    except FileNotFoundError as e:
      raise ConfigError(f"{p}: no such file (expected a Hugging Face config.json)") from e
    except json.JSONDecodeError as e:
      raise ConfigError(f"{p}: not valid JSON ({e})") from e
    return cls.from_hf_dict(hf, source=str(p), **overrides)

  def to_hf_dict(self) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
        "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
        "head_dim": self.head_dim, "intermediate_size": self.ffn_dim, "rms_norm_eps": self.norm_eps,
        "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_seq_len, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
        "torch_dtype": self.param_dtype,
    }
    if self.rope_scaling is not None:
      hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    return hf


# Presets: architecture only (numerics are set by the run config).
LLAMA_PRESETS = {
    "llama3_8b": LlamaConfig(),
    "llama3_1_8b": LlamaConfig(rope_scaling=RopeScaling(), max_seq_len=131072),
    "llama3_1_70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                                rope_scaling=RopeScaling(), max_seq_len=131072),
    "llama3_2_1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                               tie_embeddings=True, max_seq_len=131072,
                               rope_scaling=RopeScaling(factor=32.0)),
    "llama3_2_3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192,
                               tie_embeddings=True, max_seq_len=131072,
                               rope_scaling=RopeScaling(factor=32.0)),
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                        rope_theta=10000.0, max_seq_len=512, bos_id=1, eos_id=2),
}


SEPARATIONS = ("deep", "shallow", "none")
IMAGE_IO = ("unet", "linear")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """LMFusion additions on top of a LlamaConfig."""
  separation: str = "deep"          # deep: norms+QKV+O+FFN per modality; shallow: FFN (+its norm); none: dense
  image_init: str = "copy"          # copy: image layers start as copies of the text layers; random
  image_io: str = "unet"            # unet | linear
  latent_size: int = 32             # H = W of the latent
  latent_channels: int = 4
  patch_size: int = 2               # tokens per side = latent_size // patch_size
  unet_channels: tuple = (128, 256)  # per-resolution widths of the U-Net (len = downsamples + 1 unused)
  unet_blocks: int = 2              # ResBlocks per resolution
  unet_groups: int = 32             # GroupNorm groups (clipped to the channel count)
  unet_skips: bool = True           # the upsampler also reads the downsampler's per-level features (U-Net
                                    # skips); False: every bit of the noise prediction passes the transformer
  time_embed_dim: int = 256
  boi_id: int = 128002
  eoi_id: int = 128003

  def __post_init__(self):
    _check_choice("fusion.separation", self.separation, SEPARATIONS)
    _check_choice("fusion.image_io", self.image_io, IMAGE_IO)
    _check_choice("fusion.image_init", self.image_init, ("copy", "random"))
    for name in ("latent_size", "latent_channels", "patch_size", "unet_blocks", "unet_groups", "time_embed_dim"):
      check_int(f"fusion.{name}", getattr(self, name), minimum=1)
    if not isinstance(self.unet_channels, tuple) or not self.unet_channels:
      raise ConfigError(f"fusion.unet_channels={self.unet_channels!r}: expected a non-empty list of integers")
    for i, c in enumerate(self.unet_channels):
      check_int(f"fusion.unet_channels[{i}]", c, minimum=1)
    if not isinstance(self.unet_skips, bool):
      raise ConfigError(f"fusion.unet_skips={self.unet_skips!r}: expected true or false")
    check_int("fusion.boi_id", self.boi_id)
    check_int("fusion.eoi_id", self.eoi_id)
    if self.latent_size % self.patch_size:
      raise ConfigError(f"fusion.latent_size={self.latent_size} is not divisible by "
                        f"fusion.patch_size={self.patch_size}")
    if self.image_io == "unet" and self.patch_size != 2 ** (len(self.unet_channels) - 1):
      raise ConfigError(f"fusion.patch_size={self.patch_size} must equal 2**(len(unet_channels)-1)="
                        f"{2 ** (len(self.unet_channels) - 1)} for the U-Net (one 2x downsample per level)")

  @property
  def tokens_per_image(self) -> int:
    return (self.latent_size // self.patch_size) ** 2

  def replace(self, **kw) -> "FusionConfig":
    return dataclasses.replace(self, **kw)


def _as_dict(cd: Any) -> dict:
  if cd is None:
    return {}
  if hasattr(cd, "to_dict"):
    return cd.to_dict()
  return dict(cd)


def llama_config_from(cd: Any) -> LlamaConfig:
  """Builds a LlamaConfig from an ml_collections `config.model` (preset name + overrides)."""
  d = _as_dict(cd)
  preset = d.pop("preset", None)
  hf_config = d.pop("hf_config", None)
  if hf_config:
    base = LlamaConfig.from_hf_file(hf_config)
  elif preset:
    if not isinstance(preset, str) or preset not in LLAMA_PRESETS:
      raise ConfigError(f"model.preset={preset!r}: unknown (known: {sorted(LLAMA_PRESETS)})")
    base = LLAMA_PRESETS[preset]
  else:
    base = LlamaConfig()
  rs = d.pop("rope_scaling", "keep")
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ConfigError(f"model: unknown field(s) {sorted(unknown)}")
  out = dataclasses.replace(base, **d)
  if isinstance(rs, str) and rs == "keep":
    return out
  if rs and not hasattr(rs, "keys"):
    raise ConfigError(f"model.rope_scaling={rs!r}: expected None or a dict of "
                      f"{[f.name for f in dataclasses.fields(RopeScaling)]}")
  rs = _as_dict(rs) if rs else None
  if rs:
    rs = {k: v for k, v in rs.items() if not (k in ("rope_type", "type") and v == "llama3")}
    unknown_rs = set(rs) - {f.name for f in dataclasses.fields(RopeScaling)}
    if unknown_rs:
      raise ConfigError(f"model.rope_scaling: unknown field(s) {sorted(unknown_rs)}")
  return dataclasses.replace(out, rope_scaling=RopeScaling(**rs) if rs else None)


def fusion_config_from(cd: Any) -> FusionConfig:
  d = _as_dict(cd)
  fields = {f.name for f in dataclasses.fields(FusionConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ConfigError(f"fusion: unknown field(s) {sorted(unknown)}")
  if "unet_channels" in d:
    if isinstance(d["unet_channels"], (str, bytes)) or not hasattr(d["unet_channels"], "__iter__"):
      raise ConfigError(f"fusion.unet_channels={d['unet_channels']!r}: expected a list of integers")
    d["unet_channels"] = tuple(d["unet_channels"])
  return FusionConfig(**d)
