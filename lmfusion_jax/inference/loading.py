"""Load an LMFusion model for inference from any kind of checkpoint (lmfusion_jax.checkpoints.resolve).

  load_model(checkpoint, mesh=None, step=None) -> LoadedModel(llama, fusion, diffusion, params, mesh, run_config)

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
    return LoadedModel(llama, fusion, DiffusionConfig(), params, mesh, None)
  record = run_record(path)
  llama, fusion, diffusion = configs_from_record(record, str(path / train_state.RUN_CONFIG))
  target = sharded.abstract_params(llama, fusion, mesh)
  params, _ = train_state.restore_params_only(path / train_state.CHECKPOINTS_DIR,
                                              path_step if step is None else step, target)
  return LoadedModel(llama, fusion, diffusion, params, mesh, record.get("config"))


def tokenizer_dir_of(loaded: LoadedModel, override: Optional[str] = None) -> str:
  """The tokenizer folder: `override` if given, else the training run's data.tokenizer_dir."""
  if override:
    return override
  tok = ((loaded.run_config or {}).get("data") or {}).get("tokenizer_dir")
  if not tok:
    raise CheckpointError("no tokenizer: the checkpoint records no data.tokenizer_dir (a params checkpoint); "
                          "pass --tokenizer DIR")
  return tok
