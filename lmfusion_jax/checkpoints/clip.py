"""The converted CLIP folder (`lmfusion-jax convert-clip --hf-dir D --out C` writes it; CLIP score reads it):

  config.json         {"format": FORMAT_TAG, "clip": CLIPConfig, "image_processor": ImageProcessorConfig,
                       "source": the HF folder}
  params.safetensors  keys = our parameter paths joined by "/" (small, frozen, loaded whole: as the VAE)
  tokenizer/          the HF folder's tokenizer files (CLIP score tokenizes captions from them)

written under a temporary name and renamed into place (checkpoints.files.write_dir).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict

import jax
import numpy as np
import safetensors.flax
from etils import epath
from flax import nnx
from safetensors import safe_open

from lmfusion_jax.checkpoints.files import CheckpointError, write_dir
from lmfusion_jax.checkpoints.params import copy_tokenizer_files, has_tokenizer
from lmfusion_jax.checkpoints.vae import local_file, read_json
from lmfusion_jax.convert.hf_clip import (CONFIG_FILE, FORMAT_TAG, PARAMS_FILE, TOKENIZER_DIR, ConversionError,
                                          _abstract, build_module)
from lmfusion_jax.models.clip import CLIP, CLIPConfig, ImageProcessorConfig


@dataclasses.dataclass(frozen=True)
class CLIPCheckpoint:
  """A converted CLIP folder, loaded: the model and what it takes to feed it."""
  config: CLIPConfig
  model: CLIP
  image_processor: ImageProcessorConfig
  tokenizer_dir: str

  def tokenizer(self):
    from lmfusion_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(self.tokenizer_dir)


def flat_params(model) -> Dict[str, jax.Array]:
  return {"/".join(str(p) for p in path): v.value for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_clip(model: CLIP, cfg: CLIPConfig, processor: ImageProcessorConfig, out_dir, tokenizer_from,
              source: str = "", overwrite: bool = False) -> epath.Path:
  """Writes config.json + params.safetensors + tokenizer/ (copied from the folder `tokenizer_from`) to `out_dir`,
  under a temporary name renamed into place. An existing empty `out_dir` is fine; a non-empty one needs
  `overwrite`."""
  out_dir = epath.Path(out_dir)
  if not has_tokenizer(tokenizer_from):
    raise ConversionError(f"{tokenizer_from}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                          f"CLIP score tokenizes captions with them")
  empty = out_dir.is_dir() and not any(out_dir.iterdir())
  params = {k: np.asarray(v) for k, v in flat_params(model).items()}
  config = {"format": FORMAT_TAG, "clip": cfg.to_dict(), "image_processor": processor.to_dict(), "source": source}

  def fill(tmp: epath.Path):
    (tmp / PARAMS_FILE).write_bytes(safetensors.flax.save({k: jax.numpy.asarray(v) for k, v in params.items()},
                                                          metadata={"format": FORMAT_TAG}))
    copy_tokenizer_files(tokenizer_from, tmp / TOKENIZER_DIR)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

  return write_dir(out_dir, fill, overwrite or empty)


def load_clip(ckpt_dir) -> CLIPCheckpoint:
  """Reads a folder written by `save_clip` (bit for bit)."""
  ckpt_dir = epath.Path(ckpt_dir)
  config_path = ckpt_dir / CONFIG_FILE
  d = read_json(config_path, f"the CLIP checkpoint's {CONFIG_FILE}")
  if d.get("format") != FORMAT_TAG:
    raise CheckpointError(f"{config_path}: not a converted CLIP checkpoint (field 'format' is not {FORMAT_TAG!r}; "
                          f"convert a Hugging Face CLIPModel folder with `lmfusion-jax convert-clip`)")
  try:
    cfg = CLIPConfig.from_dict(d["clip"], str(config_path))
    processor = ImageProcessorConfig.from_dict(d["image_processor"], str(config_path))
  except KeyError as e:
    raise CheckpointError(f"{config_path}: missing field {e}") from e
  params_path = ckpt_dir / PARAMS_FILE
  if not params_path.exists():
    raise CheckpointError(f"{params_path}: no such file")
  ctor = lambda: CLIP(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  shapes, dtypes = _abstract(ctor)
  arrays = {}
  with local_file(params_path) as local, safe_open(local, framework="numpy") as f:
    available = set(f.keys())
    for key, shape in shapes.items():
      if key not in available:
        raise CheckpointError(f"{params_path}: missing tensor {key!r}")
      value = f.get_tensor(key)
      if tuple(value.shape) != shape or value.dtype != dtypes[key]:
        raise CheckpointError(f"{params_path}: tensor {key!r} is {value.dtype}{list(value.shape)}, expected "
                              f"{dtypes[key]}{list(shape)}")
      arrays[key] = value
  extra = sorted(available - set(shapes))
  if extra:
    raise CheckpointError(f"{params_path}: unexpected tensor(s) {extra[:5]}")
  tokenizer_dir = ckpt_dir / TOKENIZER_DIR
  if not has_tokenizer(tokenizer_dir):
    raise CheckpointError(f"{tokenizer_dir}: no tokenizer files (the checkpoint is incomplete)")
  return CLIPCheckpoint(cfg, build_module(ctor, arrays), processor, os.fspath(tokenizer_dir))
