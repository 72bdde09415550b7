"""pytorch-fid's Inception weights -> the Flax FID Inception (lmfusion_jax.evaluation.metrics.inception), and the
converted folder written / read back.

Input: pytorch-fid's weight file (pt_inception-2015-12-05-*.pth, a state_dict, read with
`torch.load(weights_only=True)`: tensors only, never arbitrary unpickling) or a `.safetensors` file with the
same keys. Every tensor the network needs is checked (name and shape) before any is used; a missing, unexpected
or wrongly shaped one is a CheckpointError naming the tensor and the file. Ignored: BatchNorm
`num_batches_tracked` counters, and the 1008-way classifier `fc.weight` / `fc.bias` (unused by pool3 features,
but checked when present: torchvision's own 1000-class ImageNet Inception is a different network and is refused).

Converted folder: `config.json` (a format tag and where the weights came from) + `params.safetensors` (keys = the
Flax parameter paths joined by "/", HWIO kernels), written under a temporary name and renamed.
"""
from __future__ import annotations

import io
import json
from typing import Dict, Mapping, Tuple

import jax
import numpy as np
from etils import epath
from flax import nnx

from lmfusion_jax.checkpoints.files import CheckpointError, write_dir
from lmfusion_jax.evaluation.metrics.inception import FIDInceptionV3

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_TAG = "lmfusion_jax.inception_fid/1"
# Flax leaf name -> the torch name under the same BasicConv2d unit
TORCH_FIELD = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias",
               "mean": "bn.running_mean", "var": "bn.running_var"}
CLASSIFIER = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}   # optional; checked when present
IGNORED_SUFFIX = ".num_batches_tracked"


def _abstract():
  """(graphdef, {flax path tuple: ShapeDtypeStruct}) of the network, allocating nothing."""
  graphdef, state = jax.eval_shape(lambda: nnx.split(FIDInceptionV3()))
  return graphdef, state, {tuple(str(p) for p in path): var.value for path, var in nnx.to_flat_state(state)}


def torch_layout() -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """pytorch-fid state_dict key -> (Flax path, torch shape) for every tensor the network needs."""
  out = {}
  for path, sds in _abstract()[2].items():
    shape = tuple(sds.shape)
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1])   # HWIO -> OIHW
    out[".".join(path[:-1]) + "." + TORCH_FIELD[path[-1]]] = (path, shape)
  return out


def _to_numpy(value, key: str, source: str) -> np.ndarray:
  if hasattr(value, "detach"):   # a torch tensor
    value = value.detach().cpu()
    value = (value.float() if value.dtype.is_floating_point else value).numpy()   # bf16/fp16 -> fp32
  if not isinstance(value, np.ndarray):
    raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor "
                          f"(expected pytorch-fid's Inception state_dict)")
  return value


def read_state_dict(path) -> Dict[str, np.ndarray]:
  """A pytorch-fid weight file (torch state_dict, weights_only) or a .safetensors file -> {key: array}."""
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"{p}: no such file (expected pytorch-fid's Inception weights, .pth or .safetensors)")
  data = p.read_bytes()
  if p.name.endswith(".safetensors"):
    import safetensors.numpy
    try:
      raw = safetensors.numpy.load(data)
    except Exception as e:   # safetensors raises several types for a bad header
      raise CheckpointError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  else:
    import torch
    try:
      raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError (a non-tensor object refused), RuntimeError (not a torch file) ...
      raise CheckpointError(f"{p}: not a torch state_dict readable with weights_only=True "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  if not isinstance(raw, Mapping):
    raise CheckpointError(f"{p}: holds a {type(raw).__name__}, expected a state_dict (a mapping of tensors)")
  return {str(k): _to_numpy(v, str(k), str(p)) for k, v in raw.items()}


def _check(arrays: Mapping[str, np.ndarray], expected: Mapping[str, Tuple[int, ...]], source: str,
           optional: Mapping[str, Tuple[int, ...]] | None = None, ignored_suffix: str | None = None) -> None:
  """Every expected key present with its shape and finite; nothing unknown. Raises CheckpointError."""
  optional = optional or {}
  missing = [k for k in expected if k not in arrays]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more} (expected the FID Inception-v3 of "
                          f"pytorch-fid; is this another architecture?)")
  unexpected = sorted(k for k in arrays if k not in expected and k not in optional
                      and not (ignored_suffix and k.endswith(ignored_suffix)))
  if unexpected:
    more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
    raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}{more} (not in the FID Inception-v3 "
                          f"of pytorch-fid; is this another architecture?)")
  for key, shape in {**expected, **{k: s for k, s in optional.items() if k in arrays}}.items():
    got = tuple(arrays[key].shape)
    if got != tuple(shape):
      raise CheckpointError(f"{source}: tensor {key!r} has shape {list(got)}, expected {list(shape)} "
                            f"(the FID Inception-v3 of pytorch-fid)")
  for key in expected:
    if not np.all(np.isfinite(arrays[key])):
      raise CheckpointError(f"{source}: tensor {key!r} has NaN or Inf entries")


def _build(arrays: Mapping[Tuple[str, ...], np.ndarray]) -> FIDInceptionV3:
  """The network holding the given float32 values (keys = Flax paths)."""
  graphdef, state, _ = _abstract()
  pure: dict = {}
  for path, value in arrays.items():
    node = pure
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jax.numpy.asarray(value, jax.numpy.float32)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state_dict") -> FIDInceptionV3:
  """pytorch-fid's state_dict (numpy arrays, torch layouts) -> the Flax network; checked first."""
  layout = torch_layout()
  _check(state_dict, {k: shape for k, (_, shape) in layout.items()}, source, CLASSIFIER, IGNORED_SUFFIX)
  arrays = {}
  for key, (path, _) in layout.items():
    v = np.asarray(state_dict[key], np.float32)
    arrays[path] = v.transpose(2, 3, 1, 0) if path[-1] == "kernel" else v   # OIHW -> HWIO
  return _build(arrays)


def convert_inception(weights_path) -> FIDInceptionV3:
  """A pytorch-fid weight file (.pth state_dict or .safetensors) -> the Flax network."""
  return convert_state_dict(read_state_dict(weights_path), str(weights_path))


def save_inception(model: FIDInceptionV3, out_dir, source: str = "", overwrite: bool = False) -> epath.Path:
  """Writes config.json + params.safetensors to `out_dir` (a temporary folder, then a rename)."""
  import safetensors.numpy
  params = {"/".join(str(p) for p in path): np.asarray(var.value, np.float32)
            for path, var in nnx.to_flat_state(nnx.state(model))}
  config = {"format": FORMAT_TAG, "feature_dim": 2048, "source": source}

  def fill(tmp: epath.Path):
    (tmp / PARAMS_FILE).write_bytes(safetensors.numpy.save(params, metadata={"format": FORMAT_TAG}))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

  return write_dir(out_dir, fill, overwrite)


def load_inception(ckpt_dir) -> FIDInceptionV3:
  """Reads a folder written by `save_inception` (`lmfusion-jax convert-inception`), every tensor checked."""
  import safetensors.numpy
  ckpt_dir = epath.Path(ckpt_dir)
  config_path, params_path = ckpt_dir / CONFIG_FILE, ckpt_dir / PARAMS_FILE
  if not config_path.exists() or not params_path.exists():
    raise CheckpointError(f"{ckpt_dir}: not a converted FID Inception folder (expected {CONFIG_FILE} and "
                          f"{PARAMS_FILE}; make one with `lmfusion-jax convert-inception`)")
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
  if not isinstance(config, dict) or config.get("format") != FORMAT_TAG:
    raise CheckpointError(f"{config_path}: not a converted FID Inception (field 'format' is not {FORMAT_TAG!r})")
  try:
    raw = safetensors.numpy.load(params_path.read_bytes())
  except Exception as e:
    raise CheckpointError(f"{params_path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
  expected = {"/".join(path): tuple(sds.shape) for path, sds in _abstract()[2].items()}
  _check(raw, expected, str(params_path))
  return _build({tuple(k.split("/")): raw[k] for k in expected})
