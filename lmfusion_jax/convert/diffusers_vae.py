"""diffusers AutoencoderKL folder -> Flax VAE (`lmfusion_jax.models.vae`), and the Flax VAE checkpoint.

Reads only `config.json` and safetensors (never pickle/torch.load), one tensor at a time, through a
declarative key map: our parameter path (which mirrors diffusers' module names) gives the diffusers
key by the renames below, and the leaf kind gives the layout change (conv OIHW -> HWIO, linear
[out, in] -> [in, out]). Older diffusers spellings of the mid-block attention (query/key/value/proj_attn)
are accepted too. Every tensor must be present with the expected shape and every tensor in the file
must be used; otherwise a `CheckpointError` names the file and the tensor.

The diffusers config.json is parsed here too (`vae_config_from_diffusers`). The result is saved as a Flax VAE
checkpoint (lmfusion_jax.checkpoints.vae); CLI: `lmfusion-jax convert-vae --diffusers-dir DIR --out DIR`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import safe_open

from lmfusion_jax.checkpoints import vae as vae_ckpt
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.models.config import DTYPES
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"


# --- the config -------------------------------------------------------------------------------------

def vae_config_from_diffusers(d: dict, source: str = "config.json", **overrides) -> VAEConfig:
  """Builds a config from a diffusers AutoencoderKL config.json dict.

  Raises ConfigError naming `source` and the field for layouts this implementation does not cover.
  """
  cls_name = d.get("_class_name", "AutoencoderKL")
  if cls_name != "AutoencoderKL":
    raise ConfigError(f"{source}: field '_class_name' is {cls_name!r}; only 'AutoencoderKL' is supported")
  block_out = tuple(d.get("block_out_channels", (64,)))
  n = len(block_out)
  down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",) * n))
  up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",) * n))
  if any(t != "DownEncoderBlock2D" for t in down):
    raise ConfigError(f"{source}: field 'down_block_types'={list(down)}; only 'DownEncoderBlock2D' is supported")
  if any(t != "UpDecoderBlock2D" for t in up):
    raise ConfigError(f"{source}: field 'up_block_types'={list(up)}; only 'UpDecoderBlock2D' is supported")
  if len(down) != n or len(up) != n:
    raise ConfigError(f"{source}: fields 'down_block_types' ({len(down)}) and 'up_block_types' ({len(up)}) "
                      f"must have one entry per 'block_out_channels' ({n})")
  if d.get("act_fn", "silu") != "silu":
    raise ConfigError(f"{source}: field 'act_fn'={d.get('act_fn')!r}; only 'silu' is supported")
  for field in ("latents_mean", "latents_std"):
    if d.get(field) is not None:
      raise ConfigError(f"{source}: field {field!r} is set; per-channel latent statistics are not supported "
                        f"(only 'scaling_factor' and 'shift_factor')")
  shift = d.get("shift_factor")
  kw = dict(
      block_out_channels=block_out, layers_per_block=int(d.get("layers_per_block", 1)),
      latent_channels=int(d.get("latent_channels", 4)), norm_num_groups=int(d.get("norm_num_groups", 32)),
      in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
      scaling_factor=float(d.get("scaling_factor", 0.18215)),
      shift_factor=None if shift is None else float(shift),
      sample_size=int(_first(d.get("sample_size", 32))),
      use_quant_conv=bool(d.get("use_quant_conv", True)),
      use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(d.get("mid_block_add_attention", True)))
  kw.update(overrides)
  try:
    return VAEConfig(**kw)
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


# --- the key map ------------------------------------------------------------------------------------

# Our leaf name -> diffusers leaf name.
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Our module name -> diffusers module name (diffusers wraps the output projection in a ModuleList).
MODULE_NAMES = {"to_out": "to_out.0"}
# Current diffusers attention names -> the names of older diffusers checkpoints (AttentionBlock).
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """Where one Flax parameter comes from in a diffusers safetensors file."""
  key: str                  # diffusers name, e.g. "encoder.conv_in.weight"
  legacy_key: str | None    # an older accepted spelling, or None
  torch_shape: tuple        # shape in the diffusers file
  to_flax: Callable         # np.ndarray in torch layout -> np.ndarray in our layout


def _conv_to_flax(w):    # [out, in, kh, kw] -> [kh, kw, in, out]
  return np.transpose(w, (2, 3, 1, 0))


def _linear_to_flax(w):  # [out, in] (or legacy 1x1 conv [out, in, 1, 1]) -> [in, out]
  return np.transpose(w.reshape(w.shape[0], w.shape[1]))


def _identity(w):
  return w


def _rule_for(path: Tuple[str, ...], shape: tuple) -> TensorRule:
  modules = [MODULE_NAMES.get(p, p) for p in path[:-1]]
  leaf = LEAF_NAMES[path[-1]]
  key = ".".join(modules + [leaf])
  legacy = None
  if modules and modules[-1] in LEGACY_ATTENTION_NAMES:
    legacy = ".".join(modules[:-1] + [LEGACY_ATTENTION_NAMES[modules[-1]], leaf])
  if path[-1] == "kernel" and len(shape) == 4:
    return TensorRule(key, legacy, (shape[3], shape[2], shape[0], shape[1]), _conv_to_flax)
  if path[-1] == "kernel" and len(shape) == 2:
    return TensorRule(key, legacy, (shape[1], shape[0]), _linear_to_flax)
  return TensorRule(key, legacy, tuple(shape), _identity)


def diffusers_key_map(cfg: VAEConfig) -> Dict[Tuple[str, ...], TensorRule]:
  """Our parameter path -> TensorRule, for every parameter of the VAE described by `cfg`."""
  _, state = vae_ckpt.abstract_vae(cfg)
  return {path: _rule_for(path, tuple(v.shape)) for path, v in vae_ckpt.flat_params(state).items()}


# --- reading -----------------------------------------------------------------------------------------

def _find_weights(folder: epath.Path) -> epath.Path:
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: not a directory (expected a diffusers AutoencoderKL folder)")
  path = folder / DIFFUSERS_WEIGHTS
  if path.exists():
    return path
  found = sorted(p.name for p in folder.iterdir())
  candidates = [n for n in found if n.endswith(".safetensors")]
  if len(candidates) == 1:
    return folder / candidates[0]
  raise CheckpointError(
      f"{folder}: no {DIFFUSERS_WEIGHTS} (found: {found or 'nothing'}). Only safetensors weights are read; "
      f"re-save the model with `AutoencoderKL.save_pretrained(dir, safe_serialization=True)`.")


def load_diffusers_vae(folder) -> Tuple[VAEConfig, AutoencoderKL]:
  """Reads a diffusers AutoencoderKL folder (config.json + safetensors) -> (VAEConfig, Flax module)."""
  folder = epath.Path(folder)
  weights = _find_weights(folder)
  config_path = folder / CONFIG_FILE
  cfg = vae_config_from_diffusers(vae_ckpt.read_json(config_path, f"the diffusers {CONFIG_FILE}"), source=str(config_path))
  key_map = diffusers_key_map(cfg)
  dtype = DTYPES[cfg.param_dtype]
  arrays = {}
  with vae_ckpt.local_file(weights) as local:
    try:
      handle = safe_open(local, framework="flax")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
    with handle as f:
      available = set(f.keys())
      used = set()
      for path, rule in key_map.items():
        key = rule.key if rule.key in available else rule.legacy_key
        if key not in available:
          raise CheckpointError(f"{weights}: missing tensor {rule.key!r} (needed for "
                                   f"{'/'.join(path)}; check config.json matches the weights)")
        shape = tuple(f.get_slice(key).get_shape())
        ok = shape == rule.torch_shape or (rule.to_flax is _linear_to_flax and
                                           shape == rule.torch_shape + (1, 1))
        if not ok:
          raise CheckpointError(f"{weights}: tensor {key!r} has shape {shape}, "
                                   f"expected {rule.torch_shape} from {config_path}")
        value = np.asarray(f.get_tensor(key).astype(jnp.float32))
        arrays[path] = jnp.asarray(rule.to_flax(value), dtype)
        used.add(key)
  unused = sorted(available - used)
  if unused:
    raise CheckpointError(f"{weights}: {len(unused)} tensor(s) not used by the layout in {config_path}, "
                             f"e.g. {unused[:5]} (unsupported layout or config/weights mismatch)")
  return cfg, vae_ckpt.build_vae(cfg, arrays)


# --- CLI ----------------------------------------------------------------------------------------------
