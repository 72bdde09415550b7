"""diffusers AutoencoderKL folder -> Flax VAE (`lmfusion_jax.models.vae`), and the Flax VAE checkpoint.

Reads only `config.json` and safetensors (never pickle/torch.load), one tensor at a time, through a
declarative key map: our parameter path (which mirrors diffusers' module names) gives the diffusers
key by the renames below, and the leaf kind gives the layout change (conv OIHW -> HWIO, linear
[out, in] -> [in, out]). Older diffusers spellings of the mid-block attention (query/key/value/proj_attn)
are accepted too. Every tensor must be present with the expected shape and every tensor in the file
must be used; otherwise a `VAECheckpointError` names the file and the tensor.

Flax VAE checkpoint (`save_vae` / `load_vae`): a folder holding `config.json` (our VAEConfig plus a
format tag) and `params.safetensors` (keys = parameter paths joined by "/"). The VAE is frozen and
small, loaded whole by every host of the data pipeline and the sampler, and never resharded or saved
asynchronously, so a plain, tool-readable safetensors file is simpler than an orbax tree. Folders are
written under a temporary name and renamed into place.

CLI: `lmfusion-jax convert-vae --diffusers-dir DIR --out DIR` (`add_convert_vae_parser`, `convert_vae_main`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import uuid
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
from etils import epath
from flax import nnx
from safetensors import safe_open

from lmfusion_jax.models.config import DTYPES
from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig
from lmfusion_jax.models.params import abstract_split

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_TAG = "lmfusion_jax.vae/1"


class VAECheckpointError(ValueError):
  """A VAE checkpoint folder is unusable; the message names the file and the tensor at fault."""


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


def abstract_vae(cfg: VAEConfig):
  """(graphdef, abstract nnx.State) of an AutoencoderKL, without allocating or initializing weights."""
  return abstract_split(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def _flat_params(state) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  out = {}
  for path, var in nnx.to_flat_state(state):
    out[tuple(str(p) for p in path)] = var.value
  return out


def diffusers_key_map(cfg: VAEConfig) -> Dict[Tuple[str, ...], TensorRule]:
  """Our parameter path -> TensorRule, for every parameter of the VAE described by `cfg`."""
  _, state = abstract_vae(cfg)
  return {path: _rule_for(path, tuple(v.shape)) for path, v in _flat_params(state).items()}


def _build(cfg: VAEConfig, arrays: Dict[Tuple[str, ...], np.ndarray]) -> AutoencoderKL:
  """Module with the given parameter values (paths as in `diffusers_key_map`)."""
  graphdef, state = abstract_vae(cfg)
  pure = {}
  for path, value in arrays.items():
    node = pure
    for p in path[:-1]:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


# --- reading -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _local_file(path: epath.Path):
  """A local filesystem path for `path` (copied to a temporary file when it is remote, e.g. gs://)."""
  if os.path.exists(os.fspath(path)):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path.name)
    path.copy(local)
    yield local


def _read_json(path: epath.Path) -> dict:
  if not path.exists():
    raise VAECheckpointError(f"{path}: no such file (expected the VAE's {CONFIG_FILE})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise VAECheckpointError(f"{path}: not valid JSON ({e})") from e


def _find_weights(folder: epath.Path) -> epath.Path:
  if not folder.is_dir():
    raise VAECheckpointError(f"{folder}: not a directory (expected a diffusers AutoencoderKL folder)")
  path = folder / DIFFUSERS_WEIGHTS
  if path.exists():
    return path
  found = sorted(p.name for p in folder.iterdir())
  candidates = [n for n in found if n.endswith(".safetensors")]
  if len(candidates) == 1:
    return folder / candidates[0]
  raise VAECheckpointError(
      f"{folder}: no {DIFFUSERS_WEIGHTS} (found: {found or 'nothing'}). Only safetensors weights are read; "
      f"re-save the model with `AutoencoderKL.save_pretrained(dir, safe_serialization=True)`.")


def load_diffusers_vae(folder) -> Tuple[VAEConfig, AutoencoderKL]:
  """Reads a diffusers AutoencoderKL folder (config.json + safetensors) -> (VAEConfig, Flax module)."""
  folder = epath.Path(folder)
  weights = _find_weights(folder)
  config_path = folder / CONFIG_FILE
  cfg = VAEConfig.from_diffusers_dict(_read_json(config_path), source=str(config_path))
  key_map = diffusers_key_map(cfg)
  dtype = DTYPES[cfg.param_dtype]
  arrays = {}
  with _local_file(weights) as local:
    try:
      handle = safe_open(local, framework="flax")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise VAECheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
    with handle as f:
      available = set(f.keys())
      used = set()
      for path, rule in key_map.items():
        key = rule.key if rule.key in available else rule.legacy_key
        if key not in available:
          raise VAECheckpointError(f"{weights}: missing tensor {rule.key!r} (needed for "
                                   f"{'/'.join(path)}; check config.json matches the weights)")
        shape = tuple(f.get_slice(key).get_shape())
        ok = shape == rule.torch_shape or (rule.to_flax is _linear_to_flax and
                                           shape == rule.torch_shape + (1, 1))
        if not ok:
          raise VAECheckpointError(f"{weights}: tensor {key!r} has shape {shape}, "
                                   f"expected {rule.torch_shape} from {config_path}")
        value = np.asarray(f.get_tensor(key).astype(jnp.float32))
        arrays[path] = jnp.asarray(rule.to_flax(value), dtype)
        used.add(key)
  unused = sorted(available - used)
  if unused:
    raise VAECheckpointError(f"{weights}: {len(unused)} tensor(s) not used by the layout in {config_path}, "
                             f"e.g. {unused[:5]} (unsupported layout or config/weights mismatch)")
  return cfg, _build(cfg, arrays)


# --- the Flax VAE checkpoint ---------------------------------------------------------------------------

def _write_atomically(out_dir: epath.Path, write: Callable[[epath.Path], None], overwrite: bool) -> None:
  """Calls write(tmp_dir), then renames tmp_dir to out_dir; nothing is left behind on failure."""
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
  old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir()
    write(tmp)
    if out_dir.exists():
      out_dir.rename(old)
    tmp.rename(out_dir)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    if old.exists() and not out_dir.exists():
      old.rename(out_dir)
    raise
  if old.exists():
    old.rmtree()


def save_vae(vae: AutoencoderKL, cfg: VAEConfig, out_dir, overwrite: bool = False) -> epath.Path:
  """Writes config.json + params.safetensors to `out_dir` (via a temporary folder, then a rename)."""
  out_dir = epath.Path(out_dir)
  params = {"/".join(path): jnp.asarray(v) for path, v in _flat_params(nnx.state(vae, nnx.Param)).items()}
  config = {"format": FORMAT_TAG, **cfg.to_dict()}

  def write(tmp: epath.Path):
    (tmp / PARAMS_FILE).write_bytes(safetensors.flax.save(params, metadata={"format": FORMAT_TAG}))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

  _write_atomically(out_dir, write, overwrite)
  return out_dir


def load_vae(ckpt_dir) -> Tuple[VAEConfig, AutoencoderKL]:
  """Reads a folder written by `save_vae` -> (VAEConfig, Flax module), bit for bit."""
  ckpt_dir = epath.Path(ckpt_dir)
  config_path = ckpt_dir / CONFIG_FILE
  d = _read_json(config_path)
  if d.pop("format", None) != FORMAT_TAG:
    raise VAECheckpointError(f"{config_path}: not a Flax VAE checkpoint (field 'format' is not {FORMAT_TAG!r}; "
                             f"convert a diffusers folder with `lmfusion-jax convert-vae`)")
  cfg = VAEConfig.from_dict(d, source=str(config_path))
  params_path = ckpt_dir / PARAMS_FILE
  if not params_path.exists():
    raise VAECheckpointError(f"{params_path}: no such file")
  _, state = abstract_vae(cfg)
  expected = _flat_params(state)
  arrays = {}
  with _local_file(params_path) as local, safe_open(local, framework="flax") as f:
    available = set(f.keys())
    for path, sds in expected.items():
      key = "/".join(path)
      if key not in available:
        raise VAECheckpointError(f"{params_path}: missing tensor {key!r}")
      value = f.get_tensor(key)
      if tuple(value.shape) != tuple(sds.shape) or value.dtype != sds.dtype:
        raise VAECheckpointError(f"{params_path}: tensor {key!r} is {value.dtype}{tuple(value.shape)}, "
                                 f"expected {sds.dtype}{tuple(sds.shape)}")
      arrays[path] = value
    extra = sorted(available - {"/".join(p) for p in expected})
  if extra:
    raise VAECheckpointError(f"{params_path}: unexpected tensor(s) {extra[:5]}")
  return cfg, _build(cfg, arrays)


# --- CLI ----------------------------------------------------------------------------------------------
