"""Training checkpoints: an orbax CheckpointManager (async saves, keep last K) holding two items per step:
  state  the train state as a plain dict {params: {text, image}, opt_state, step, rng}
  data   the Grain iterator state (per process), so a resumed run sees exactly the remaining batches.
Restores always go against an abstract state built on the CURRENT mesh, so a checkpoint written on one
mesh loads on any other. The run's resolved config is written beside the steps as `run_config.json`.
"""
from __future__ import annotations

from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from lmfusion_jax.checkpoints.files import CheckpointError

RUN_CONFIG = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"   # WORKDIR/checkpoints/<step>/{state,data}


class Checkpointer:
  def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, save_every), enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, data_iterator=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state for this config "
                            f"({type(e).__name__}: {e})") from e
    return out["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params_only(directory, step: Optional[int], abstract_params: dict) -> tuple[dict, int]:
  """Restores just `state.params` of a training checkpoint (optimizer state is never read).

  `directory` is the checkpoints folder (workdir/checkpoints). Returns (params, step).
  """
  directory = epath.Path(directory)
  mngr = ocp.CheckpointManager(directory, item_names=("state",),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory}: no checkpoint steps found")
  ckptr = ocp.PyTreeCheckpointer()
  path = directory / str(step) / "state"
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                              abstract_params)
  try:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from e
  return out["params"], step
