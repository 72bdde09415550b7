"""Training checkpoints: an orbax CheckpointManager (async saves, keep last K) holding two items per step:
  state  the train state as a plain dict {params: {text, image}, opt_state, step, rng}
  data   the Grain iterator state (per process), so a resumed run sees exactly the remaining batches.
Restores always go against an abstract state built on the CURRENT mesh, so a checkpoint written on one
mesh loads on any other. The run's resolved config is written beside the steps as `run_config.json`.

A step is complete when orbax has committed it (written under a temporary name, then renamed; a kill -9
mid-save leaves only the temporary, removed at the next start). `restore_latest` falls back from a damaged
newest step to the previous good one, with a warning naming the step and the file at fault.
"""
from __future__ import annotations

from typing import Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from lmfusion_jax.checkpoints.files import CheckpointError, absolute_path, missing_or_empty

RUN_CONFIG = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"   # WORKDIR/checkpoints/<step>/{state,data}
# What a committed step holds (orbax's layout); a missing one names the damaged file in messages.
STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


def step_problems(step_dir) -> list:
  """The expected files missing or empty in a step folder ([] = looks complete)."""
  step_dir = epath.Path(step_dir)
  bad = missing_or_empty(step_dir, STEP_FILES)
  if (step_dir / "data").exists() and not any((step_dir / "data").glob("process_*")):
    bad.append("data/process_*.json")
  return bad


class Checkpointer:
  def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = epath.Path(absolute_path(directory))   # orbax needs an absolute path
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
    step_dir = self.directory / str(step)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax / tensorstore / json raise many types for a damaged step
      missing = step_problems(step_dir)
      where = f"missing or empty: {', '.join(missing)}" if missing else f"{type(e).__name__}: {e}"
      raise CheckpointError(f"checkpoint {step_dir} is damaged or unreadable ({where})") from e
    return out["state"]

  def restore_latest(self, abstract_state: dict, data_iterator=None,
                     warn: Callable[[str], None] = print) -> tuple[Optional[dict], Optional[int]]:
    """The newest step that restores, falling back past damaged ones (each named in a warning);
    (None, None) when there are no steps. All damaged: the newest step's error."""
    steps = sorted(self.all_steps(), reverse=True)
    first_error, damaged = None, []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointError as e:
        first_error = first_error or e
        damaged.append(step)
        warn(f"WARNING: {e}; trying the previous checkpoint")
        continue
      if damaged:
        self._set_aside(damaged, warn)
      return state, step
    if first_error is not None:
      raise CheckpointError(f"no checkpoint under {self.directory} restores (steps {steps}); newest: "
                            f"{first_error}")
    return None, None

  def _set_aside(self, steps, warn) -> None:
    """Renames damaged step folders to `<step>.damaged` (kept for inspection, out of orbax's way: the resumed
    run saves those steps again), on process 0, then every process re-reads the step list."""
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.damaged"
        if dst.exists():
          dst.rmtree()
        src.rename(dst)
        warn(f"WARNING: moved the damaged checkpoint {src} to {dst}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("lmfusion_damaged_checkpoints_set_aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params_only(directory, step: Optional[int], abstract_params: dict) -> tuple[dict, int]:
  """Restores just `state.params` of a training checkpoint (optimizer state is never read).

  `directory` is the checkpoints folder (workdir/checkpoints). Returns (params, step).
  """
  directory = epath.Path(absolute_path(directory))
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
  except Exception as e:  # orbax / tensorstore raise many types for damaged or foreign checkpoints
    missing = step_problems(directory / str(step))
    where = f"missing or empty: {', '.join(missing)}" if missing else f"{type(e).__name__}: {e}"
    raise CheckpointError(f"checkpoint {directory / str(step)}: cannot restore the parameters ({where})") from e
  return out["params"], step
