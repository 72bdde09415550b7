"""Model hyper-parameters as frozen dataclasses (hashable, so they can be static jit arguments).

`LlamaConfig` describes the text tower and maps to/from a Hugging Face `config.json`.
`FusionConfig` adds what LMFusion needs on top: separation mode, image in/out modules, BOI/EOI ids.
Run-level knobs live in ml_collections configs under configs/; `from_config_dict` builds these from them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax.numpy as jnp

from lmfusion_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# "xla": plain XLA (runs anywhere); "flash": the Pallas TPU kernel (models/flash_attention.py);
# "flash_interpret": the same kernel interpreted (CPU; tests).
ATTENTION_IMPLS = ("xla", "flash", "flash_interpret")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ConfigError(UserError):
  """A configuration field has an unusable value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1/3.2 "llama3" RoPE frequency scaling."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


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

  def __post_init__(self):
    if self.param_dtype not in DTYPES:
      raise ConfigError(f"model.param_dtype={self.param_dtype!r}: expected one of {sorted(DTYPES)}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"model.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"model.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"model.attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
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
    """Builds a config from a HF LlamaConfig dict; unknown rope types raise naming the field."""
    def need(key):
      if key not in hf:
        raise ConfigError(f"{source}: missing field {key!r}")
      return hf[key]
    scaling = None
    rs = hf.get("rope_scaling") or None
    # transformers 5 moved rope settings into "rope_parameters"; accept both spellings.
    rp = hf.get("rope_parameters") or None
    if rs is None and rp is not None and rp.get("rope_type", "default") != "default":
      rs = rp
    rope_theta = hf.get("rope_theta", (rp or {}).get("rope_theta", 10000.0))
    if rs is not None:
      rtype = rs.get("rope_type", rs.get("type"))
      if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: unsupported rope_scaling type {rtype!r} in field 'rope_scaling' "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
      if rtype == "llama3":
        scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                              high_freq_factor=float(rs["high_freq_factor"]),
                              original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    n_heads = int(need("num_attention_heads"))
    dim = int(need("hidden_size"))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ConfigError(f"{source}: attention_bias/mlp_bias=true is not a Llama-3 layout and is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"{source}: hidden_act={hf.get('hidden_act')!r}; only 'silu' is supported")
    bos = hf.get("bos_token_id", 1)
    eos = hf.get("eos_token_id", 2)
    if isinstance(eos, list):
      eos = eos[0]
    kw = dict(
        vocab_size=int(need("vocab_size")), dim=dim, n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or dim // n_heads), ffn_dim=int(need("intermediate_size")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta), rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        bos_id=int(bos if bos is not None else 0), eos_id=int(eos if eos is not None else 0))
    kw.update(overrides)
    return cls(**kw)

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
  time_embed_dim: int = 256
  boi_id: int = 128002
  eoi_id: int = 128003

  def __post_init__(self):
    if self.separation not in SEPARATIONS:
      raise ConfigError(f"fusion.separation={self.separation!r}: expected one of {SEPARATIONS}")
    if self.image_io not in IMAGE_IO:
      raise ConfigError(f"fusion.image_io={self.image_io!r}: expected one of {IMAGE_IO}")
    if self.image_init not in ("copy", "random"):
      raise ConfigError(f"fusion.image_init={self.image_init!r}: expected 'copy' or 'random'")
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
    if preset not in LLAMA_PRESETS:
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
  if rs != "keep":
    out = dataclasses.replace(out, rope_scaling=RopeScaling(**rs) if rs else None)
  return out


def fusion_config_from(cd: Any) -> FusionConfig:
  d = _as_dict(cd)
  fields = {f.name for f in dataclasses.fields(FusionConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ConfigError(f"fusion: unknown field(s) {sorted(unknown)}")
  if "unet_channels" in d:
    d["unet_channels"] = tuple(d["unet_channels"])
  return FusionConfig(**d)
