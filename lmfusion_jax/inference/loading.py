"""Load an LMFusion model for inference from any of the three things a user calls a checkpoint.

  load_model(checkpoint, mesh=None, step=None) -> LoadedModel(llama, fusion, diffusion, params, mesh, run_config)

`checkpoint` may be
  a training workdir      DIR/run_config.json + DIR/checkpoints/<step>/state   (latest step unless `step`)
  a training step dir     DIR/checkpoints/<step>                                (that step)
  a params checkpoint     DIR/lmfusion.json + DIR/params   (from `convert-llama` or `params_io.save_params`)
Only the parameters are read (never the optimizer state). They are restored directly onto `mesh`, by default
a ("data", "fsdp", "tensor") = (1, all devices, 1) mesh over WHATEVER devices exist now: a checkpoint saved
from any training mesh loads on any other (the restore target is built from the model's logical axis names).
"""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

from etils import epath
from jax.sharding import Mesh

from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax import sharding
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models.config import ConfigError, FusionConfig, LlamaConfig, fusion_config_from, llama_config_from


class LoadedModel(NamedTuple):
  llama: LlamaConfig
  fusion: FusionConfig
  diffusion: DiffusionConfig
  params: dict                     # {"text": ..., "image": ...}, sharded on `mesh`
  mesh: Mesh
  run_config: Optional[dict]       # the training run's `config` section (None for a params checkpoint)


class ModelLoadError(ValueError):
  """The path is not a loadable checkpoint; the message names the path and what is missing."""


def _run_config_record(workdir: epath.Path) -> dict:
  f = workdir / ckpt_lib.RUN_CONFIG
  try:
    record = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{f}: not valid JSON ({e})") from e
  missing = [k for k in ("llama", "fusion", "diffusion") if k not in record]
  if missing:
    raise ModelLoadError(f"{f}: missing field(s) {missing}")
  return record


def configs_from_record(record: dict, source: str) -> tuple[LlamaConfig, FusionConfig, DiffusionConfig]:
  """Model configs from a run_config.json record (written by train.py with resolved special ids)."""
  try:
    llama = llama_config_from(dict(record["llama"]))
    fusion = fusion_config_from(dict(record["fusion"]))
    diffusion = DiffusionConfig(**record["diffusion"])
  except (ConfigError, TypeError, ValueError) as e:
    raise ModelLoadError(f"{source}: cannot build the model config: {e}") from e
  return llama, fusion, diffusion


def resolve_checkpoint(checkpoint) -> tuple[str, epath.Path, Optional[int]]:
  """("params", dir, None) | ("train", workdir, step or None) for a user-supplied path."""
  p = epath.Path(checkpoint)
  if not p.exists():
    raise ModelLoadError(f"--checkpoint {p}: no such file or directory")
  if (p / params_io.CONFIG_FILE).exists():
    return "params", p, None
  if (p / ckpt_lib.RUN_CONFIG).exists():
    return "train", p, None
  if p.name == "checkpoints" and (p.parent / ckpt_lib.RUN_CONFIG).exists():
    return "train", p.parent, None
  if p.name.isdigit() and (p / "state").exists() and (p.parent.parent / ckpt_lib.RUN_CONFIG).exists():
    return "train", p.parent.parent, int(p.name)
  raise ModelLoadError(
      f"--checkpoint {p}: not a params checkpoint (no {params_io.CONFIG_FILE}), a training workdir (no "
      f"{ckpt_lib.RUN_CONFIG}) or a training step directory (WORKDIR/checkpoints/<step> with a `state` item)")


def default_mesh() -> Mesh:
  """All devices on the fsdp axis: parameters sharded, any device count."""
  return sharding.make_mesh(data=1, fsdp=-1, tensor=1)


def load_model(checkpoint, mesh: Optional[Mesh] = None, step: Optional[int] = None) -> LoadedModel:
  """Reads configs and parameters of `checkpoint` (see the module docstring) onto `mesh`."""
  from lmfusion_jax.models import sharded
  kind, path, path_step = resolve_checkpoint(checkpoint)
  mesh = mesh if mesh is not None else default_mesh()
  if kind == "params":
    llama, fusion = params_io.read_model_config(path)
    if fusion is None:
      raise ModelLoadError(f"{path}: a text-only params checkpoint (its {params_io.CONFIG_FILE} has no "
                           f"fusion config); image generation and captioning need an LMFusion checkpoint")
    params = params_io.load_params(path, mesh=mesh, shardings=sharded.model_shardings(llama, fusion, mesh))
    return LoadedModel(llama, fusion, DiffusionConfig(), params, mesh, None)
  record = _run_config_record(path)
  llama, fusion, diffusion = configs_from_record(record, str(path / ckpt_lib.RUN_CONFIG))
  if step is None:
    step = path_step
  target = sharded.abstract_params(llama, fusion, mesh)
  params, _ = ckpt_lib.restore_params_only(path / "checkpoints", step, target)
  return LoadedModel(llama, fusion, diffusion, params, mesh, record.get("config"))


def tokenizer_dir_of(loaded: LoadedModel, override: Optional[str] = None) -> str:
  """The tokenizer folder: `override` if given, else the training run's data.tokenizer_dir."""
  if override:
    return override
  tok = ((loaded.run_config or {}).get("data") or {}).get("tokenizer_dir")
  if not tok:
    raise ModelLoadError("no tokenizer: the checkpoint records no data.tokenizer_dir (a params checkpoint); "
                         "pass --tokenizer DIR")
  return tok
