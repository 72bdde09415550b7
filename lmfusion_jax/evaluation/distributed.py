"""How an evaluation runs on several processes (hosts): each process holds the model on a mesh of ITS OWN devices
(parameters sharded over the host's chips, a copy per host), takes the work items i with i % P == p, and the
per-item results are gathered once, in item order, so every process ends with the same full results.

Per-item results never depend on which process or batch computed them (fixed per-item noise keys, greedy
decoding), so 1 process x 4 devices and 2 processes x 2 devices give the same numbers (up to float reduction
order inside a batch). With one process every function here is the identity.

  process_mesh()            ("data", "fsdp", "tensor") mesh over jax.local_devices(), parameters on fsdp
  share(items)              this process's items: items[p::P]
  gather_json(local)        {item: JSON-able result} of every process, merged
  gather_rows(local, n)     {index: array row} of every process -> array [n, ...] in index order
  barrier(name)             every process waits here (after listing work on disk, before reading results)
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmfusion_jax import sharding


def process_mesh():
  """A mesh over this process's devices only (all devices with one process): every process restores its own
  copy of the parameters, sharded over its chips, and evaluates independently."""
  return sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.local_devices())


def share(items: Sequence) -> list:
  """This process's items: every P-th one starting at the process index."""
  return list(items)[jax.process_index()::jax.process_count()]


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order."""
  n = np.asarray([len(payload)], np.int64)
  lengths = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
  buf = np.zeros(int(lengths.max()) if lengths.size else 0, np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [every[i, :int(lengths[i])].tobytes() for i in range(len(lengths))]


def gather_json(local: Mapping[Any, Any]) -> dict:
  """The union of every process's {key: value} (JSON-able values; int or str keys, which come back as they
  went in); duplicates across processes must agree (the same item computed twice)."""
  if jax.process_count() == 1:
    return dict(local)
  pairs = [[int(k) if isinstance(k, np.integer) else k, v] for k, v in local.items()]   # pairs keep int keys
  out = {}
  for part in allgather_bytes(json.dumps(pairs).encode()):
    out.update((k, v) for k, v in json.loads(part.decode()))
  return out


def gather_rows(local: Mapping[int, np.ndarray], n: int, row_shape: Sequence[int], dtype) -> np.ndarray:
  """Rows computed across processes -> [n, *row_shape] in index order. Every index in range(n) must be
  computed by some process (an error names the first missing one)."""
  row_shape, dtype = tuple(row_shape), np.dtype(dtype)
  out = np.zeros((n,) + row_shape, dtype)
  if jax.process_count() == 1:
    have = set(local)
    for i, row in local.items():
      out[i] = row
  else:
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(local)], np.int64))).reshape(-1)
    m = int(counts.max())
    ids = np.full((m,), -1, np.int64)
    rows = np.zeros((m,) + row_shape, dtype)
    for j, (i, row) in enumerate(sorted(local.items())):
      ids[j], rows[j] = i, row
    all_ids = np.asarray(multihost_utils.process_allgather(ids)).reshape(-1)
    all_rows = np.asarray(multihost_utils.process_allgather(rows)).reshape((-1,) + row_shape)
    keep = all_ids >= 0
    out[all_ids[keep]] = all_rows[keep]
    have = set(int(i) for i in all_ids[keep])
  missing = [i for i in range(n) if i not in have]
  if missing:
    raise RuntimeError(f"gather_rows: item {missing[0]} was computed by no process ({len(missing)} missing)")
  return out
