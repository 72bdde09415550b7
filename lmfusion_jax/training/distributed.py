"""Multi-host start-up: `jax.distributed.initialize` from config/flags or the environment.

On TPU VMs JAX discovers the coordinator, process count and id by itself (call with no arguments). On other
machines they come from config.distributed.* or the env vars LMFUSION_COORDINATOR, LMFUSION_NUM_PROCESSES,
LMFUSION_PROCESS_ID (what launch/local_multihost.sh sets). CPU multi-process runs use gloo collectives.
"""
from __future__ import annotations

import os

import jax

from lmfusion_jax.errors import UserError


def _from_env(dist_cfg):
  env = os.environ
  addr = dist_cfg.coordinator_address or env.get("LMFUSION_COORDINATOR", "")
  n = int(dist_cfg.num_processes or env.get("LMFUSION_NUM_PROCESSES", 0) or 0)
  pid = int(dist_cfg.process_id if dist_cfg.process_id >= 0 else env.get("LMFUSION_PROCESS_ID", -1))
  local = dist_cfg.local_device_ids or env.get("LMFUSION_LOCAL_DEVICE_IDS", "")
  return addr, n, pid, local


_initialized = False


def initialize(dist_cfg) -> None:
  """Initializes the distributed runtime once, when this is a multi-process run; no-op otherwise."""
  global _initialized
  if _initialized:
    return
  addr, n, pid, local = _from_env(dist_cfg)
  on_tpu_vm = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"))
  if n > 1:
    if not addr or pid < 0:
      raise UserError("distributed: num_processes > 1 needs coordinator_address and process_id "
                       "(config.distributed.* or LMFUSION_COORDINATOR / LMFUSION_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if local:
      kw["local_device_ids"] = [int(x) for x in str(local).split(",")]
    jax.distributed.initialize(addr, n, pid, **kw)
    _initialized = True
  elif on_tpu_vm:
    jax.distributed.initialize()
    _initialized = True
