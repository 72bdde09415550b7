"""What a user calls a checkpoint, resolved: `resolve(path)` accepts any of

  a params checkpoint     DIR/lmfusion.json + DIR/params   (convert-llama, save_params)
  a training workdir      DIR/run_config.json + DIR/checkpoints/<step>/state   (the latest step)
  a training step dir     DIR/checkpoints/<step>                                (that step)

and says which it is. `run_record` / `configs_from_record` read a training run's run_config.json.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

from etils import epath

from lmfusion_jax.checkpoints.files import CheckpointError, absolute_path
from lmfusion_jax.checkpoints.params import CONFIG_FILE
from lmfusion_jax.checkpoints.train_state import CHECKPOINTS_DIR, RUN_CONFIG
from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models.config import ConfigError, FusionConfig, LlamaConfig, fusion_config_from, llama_config_from


class Resolved(NamedTuple):
  kind: str                 # "params" | "train"
  path: epath.Path          # the params checkpoint, or the training workdir
  step: Optional[int]       # the step a step dir names; None = the latest


def resolve(checkpoint) -> Resolved:
  """Which kind of checkpoint `checkpoint` is (see the module docstring)."""
  p = epath.Path(absolute_path(checkpoint))
  if not p.exists():
    raise CheckpointError(f"--checkpoint {p}: no such file or directory")
  if (p / CONFIG_FILE).exists():
    return Resolved("params", p, None)
  if (p / RUN_CONFIG).exists():
    return Resolved("train", p, None)
  if p.name == CHECKPOINTS_DIR and (p.parent / RUN_CONFIG).exists():
    return Resolved("train", p.parent, None)
  if p.name.isdigit() and (p / "state").exists() and (p.parent.parent / RUN_CONFIG).exists():
    return Resolved("train", p.parent.parent, int(p.name))
  raise CheckpointError(
      f"--checkpoint {p}: not a params checkpoint (no {CONFIG_FILE}), a training workdir (no "
      f"{RUN_CONFIG}) or a training step directory (WORKDIR/{CHECKPOINTS_DIR}/<step> with a `state` item)")


def run_record(workdir) -> dict:
  """The training run's run_config.json {config, llama, fusion, diffusion}."""
  f = epath.Path(workdir) / RUN_CONFIG
  try:
    record = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{f}: not valid JSON ({e})") from e
  missing = [k for k in ("llama", "fusion", "diffusion") if k not in record]
  if missing:
    raise CheckpointError(f"{f}: missing field(s) {missing}")
  return record


def configs_from_record(record: dict, source: str) -> tuple[LlamaConfig, FusionConfig, DiffusionConfig]:
  """Model configs from a run_config.json record (written by training with resolved special ids)."""
  try:
    llama = llama_config_from(dict(record["llama"]))
    fusion = fusion_config_from(dict(record["fusion"]))
    diffusion = DiffusionConfig(**record["diffusion"])
  except (ConfigError, TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: cannot build the model config: {e}") from e
  return llama, fusion, diffusion
