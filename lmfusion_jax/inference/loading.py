"""Load an LMFusion model for inference from any kind of checkpoint (lmfusion_jax.checkpoints.resolve).

  load_model(checkpoint, mesh=None, step=None) -> LoadedModel(llama, fusion, diffusion, params, mesh, run_config,
                                                              tokenizer_dir)
  load_text(checkpoint, dtype=None, step=None) -> (LlamaConfig, text params)   any kind, text branch only
  checkpoint_tokenizer(checkpoint)             the tokenizer folder that travels with a checkpoint

The tokenizer travels with the checkpoint: CKPT/tokenizer (convert-llama copies the HF folder's) or
WORKDIR/tokenizer (training copies the run's), else the run's recorded data.tokenizer_dir; `--tokenizer`
overrides.

Only the parameters are read (never the optimizer state). They are restored directly onto `mesh`, by default
a ("data", "fsdp", "tensor") = (1, all devices, 1) mesh over WHATEVER devices exist now: a checkpoint saved
from any training mesh loads on any other (the restore target is built from the model's logical axis names).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from jax.sharding import Mesh

from lmfusion_jax import sharding
from lmfusion_jax.checkpoints import params as params_ckpt
from lmfusion_jax.checkpoints import train_state
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.checkpoints.resolve import configs_from_record, resolve, run_record
from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import FusionConfig, LlamaConfig


class LoadedModel(NamedTuple):
  llama: LlamaConfig
  fusion: FusionConfig
  diffusion: DiffusionConfig
  params: dict                     # {"text": ..., "image": ...}, sharded on `mesh`
  mesh: Mesh
  run_config: Optional[dict]       # the training run's `config` section (None for a params checkpoint)
  tokenizer_dir: Optional[str] = None   # the checkpoint's own tokenizer folder, when it has one

  def model(self):
    """The LMFusion module holding the parameters."""
    return sharded.model(self.llama, self.fusion, self.params)


def default_mesh() -> Mesh:
  """All devices on the fsdp axis: parameters sharded, any device count."""
  return sharding.make_mesh(data=1, fsdp=-1, tensor=1)


def load_model(checkpoint, mesh: Optional[Mesh] = None, step: Optional[int] = None) -> LoadedModel:
  """Reads configs and parameters of `checkpoint` (see the module docstring) onto `mesh`."""
  kind, path, path_step = resolve(checkpoint)
  mesh = mesh if mesh is not None else default_mesh()
  if kind == "params":
    llama, fusion = params_ckpt.read_model_config(path)
    if fusion is None:
      raise CheckpointError(f"{path}: a text-only params checkpoint (its {params_ckpt.CONFIG_FILE} has no "
                            f"fusion config); image generation and captioning need an LMFusion checkpoint")
    params = params_ckpt.load_params(path, mesh=mesh, shardings=sharded.model_shardings(llama, fusion, mesh))
    return LoadedModel(llama, fusion, DiffusionConfig(), params, mesh, None, _tokenizer_of(path, None))
  record = run_record(path)
  llama, fusion, diffusion = configs_from_record(record, str(path / train_state.RUN_CONFIG))
  target = sharded.abstract_params(llama, fusion, mesh)
  params, _ = train_state.restore_params_only(path / train_state.CHECKPOINTS_DIR,
                                              path_step if step is None else step, target)
  return LoadedModel(llama, fusion, diffusion, params, mesh, record.get("config"),
                     _tokenizer_of(path, record.get("config")))


def checkpoint_tokenizer(checkpoint) -> Optional[str]:
  """The tokenizer folder of any kind of checkpoint (see the module docstring), or None."""
  kind, path, _ = resolve(checkpoint)
  return _tokenizer_of(path, run_record(path).get("config") if kind == "train" else None)


def _tokenizer_of(path, run_config: Optional[dict]) -> Optional[str]:
  """CHECKPOINT/tokenizer if it holds one, else the run's recorded data.tokenizer_dir (or None)."""
  own = path / params_ckpt.TOKENIZER_DIR
  if params_ckpt.has_tokenizer(own):
    return str(own)
  return ((run_config or {}).get("data") or {}).get("tokenizer_dir") or None


def recorded_run_config(checkpoint) -> Optional[dict]:
  """The training run's recorded `config` section (run_config.json), or None for a params checkpoint."""
  kind, path, _ = resolve(checkpoint)
  return run_record(path).get("config") if kind == "train" else None


def checkpoint_llama_config(checkpoint) -> LlamaConfig:
  """The Llama config of any kind of checkpoint (cheap: no parameters are read)."""
  kind, path, _ = resolve(checkpoint)
  if kind == "params":
    return params_ckpt.read_model_config(path)[0]
  return configs_from_record(run_record(path), str(path / train_state.RUN_CONFIG))[0]


def load_text(checkpoint, dtype: Optional[str] = None, step: Optional[int] = None, mesh: Optional[Mesh] = None):
  """(LlamaConfig, the `text` params) of any kind of checkpoint; only the text branch is read. With `mesh`
  the parameters are restored sharded onto it (logical axis rules), else onto one device. `dtype` casts the
  parameters (and the compute dtype)."""
  import jax
  kind, path, path_step = resolve(checkpoint)
  if kind == "params":
    llama, _ = params_ckpt.read_model_config(path)
    text = params_ckpt.load_params(path, mesh=mesh, subtree="text", dtype=dtype)
  else:
    record = run_record(path)
    llama, fusion, _ = configs_from_record(record, str(path / train_state.RUN_CONFIG))
    mesh = mesh if mesh is not None else sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    target = {"text": sharded.abstract_params(llama, fusion, mesh)["text"]}
    params, _ = train_state.restore_params_only(path / train_state.CHECKPOINTS_DIR,
                                                path_step if step is None else step, target)
    text = params["text"]
    if dtype:
      text = jax.tree.map(lambda x: x.astype(dtype), text)
  if dtype:
    llama = llama.replace(param_dtype=dtype, dtype=dtype)
  return llama, text


def tokenizer_dir_of(loaded: LoadedModel, override: Optional[str] = None) -> str:
  """The tokenizer folder: `override` if given, else the one that travels with the checkpoint."""
  if override:
    return override
  if not loaded.tokenizer_dir:
    raise CheckpointError("no tokenizer travels with this checkpoint (no tokenizer/ folder, no recorded "
                          "data.tokenizer_dir); pass --tokenizer DIR")
  return loaded.tokenizer_dir
