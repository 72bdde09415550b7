"""The Flax VAE checkpoint: a folder with `config.json` (our VAEConfig plus a format tag) and
`params.safetensors` (keys = parameter paths joined by "/").

The VAE is frozen and small, loaded whole by every host of the data pipeline and the sampler, and never
resharded or saved asynchronously, so a plain, tool-readable safetensors file is simpler than an orbax tree.
Folders are written under a temporary name and renamed into place (checkpoints.files.write_dir). A diffusers
AutoencoderKL folder becomes one with `lmfusion-jax convert-vae` (lmfusion_jax.convert.diffusers_vae).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
from etils import epath
from flax import nnx
from safetensors import safe_open

from lmfusion_jax.checkpoints.files import CheckpointError, write_dir
from lmfusion_jax.models.params import abstract_split
from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_TAG = "lmfusion_jax.vae/1"


def abstract_vae(cfg: VAEConfig):
  """(graphdef, abstract nnx.State) of an AutoencoderKL, without allocating or initializing weights."""
  return abstract_split(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def flat_params(state) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  """Parameter path (tuple of names) -> value, for every leaf of an nnx state."""
  return {tuple(str(p) for p in path): var.value for path, var in nnx.to_flat_state(state)}


def build_vae(cfg: VAEConfig, arrays: Dict[Tuple[str, ...], np.ndarray]) -> AutoencoderKL:
  """The module holding the given parameter values (paths as in `flat_params`)."""
  graphdef, state = abstract_vae(cfg)
  pure = {}
  for path, value in arrays.items():
    node = pure
    for p in path[:-1]:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


@contextlib.contextmanager
def local_file(path: epath.Path):
  """A local filesystem path for `path` (copied to a temporary file when it is remote, e.g. gs://)."""
  if os.path.exists(os.fspath(path)):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path.name)
    path.copy(local)
    yield local


def read_json(path: epath.Path, what: str) -> dict:
  if not path.exists():
    raise CheckpointError(f"{path}: no such file (expected {what})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def save_vae(vae: AutoencoderKL, cfg: VAEConfig, out_dir, overwrite: bool = False) -> epath.Path:
  """Writes config.json + params.safetensors to `out_dir` (via a temporary folder, then a rename)."""
  params = {"/".join(path): jnp.asarray(v) for path, v in flat_params(nnx.state(vae, nnx.Param)).items()}
  config = {"format": FORMAT_TAG, **cfg.to_dict()}

  def fill(tmp: epath.Path):
    (tmp / PARAMS_FILE).write_bytes(safetensors.flax.save(params, metadata={"format": FORMAT_TAG}))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

  return write_dir(out_dir, fill, overwrite)


def load_vae(ckpt_dir) -> Tuple[VAEConfig, AutoencoderKL]:
  """Reads a folder written by `save_vae` -> (VAEConfig, Flax module), bit for bit."""
  ckpt_dir = epath.Path(ckpt_dir)
  config_path = ckpt_dir / CONFIG_FILE
  d = read_json(config_path, f"the VAE's {CONFIG_FILE}")
  if d.pop("format", None) != FORMAT_TAG:
    raise CheckpointError(f"{config_path}: not a Flax VAE checkpoint (field 'format' is not {FORMAT_TAG!r}; "
                          f"convert a diffusers folder with `lmfusion-jax convert-vae`)")
  cfg = VAEConfig.from_dict(d, source=str(config_path))
  params_path = ckpt_dir / PARAMS_FILE
  if not params_path.exists():
    raise CheckpointError(f"{params_path}: no such file")
  _, state = abstract_vae(cfg)
  expected = flat_params(state)
  arrays = {}
  with local_file(params_path) as local, safe_open(local, framework="flax") as f:
    available = set(f.keys())
    for path, sds in expected.items():
      key = "/".join(path)
      if key not in available:
        raise CheckpointError(f"{params_path}: missing tensor {key!r}")
      value = f.get_tensor(key)
      if tuple(value.shape) != tuple(sds.shape) or value.dtype != sds.dtype:
        raise CheckpointError(f"{params_path}: tensor {key!r} is {value.dtype}{tuple(value.shape)}, "
                              f"expected {sds.dtype}{tuple(sds.shape)}")
      arrays[path] = value
    extra = sorted(available - {"/".join(p) for p in expected})
  if extra:
    raise CheckpointError(f"{params_path}: unexpected tensor(s) {extra[:5]}")
  return cfg, build_vae(cfg, arrays)
