"""Host-local numpy batches -> global jax Arrays sharded over ("data", "fsdp") on the batch dimension.

Every process passes its own local batch (global_batch_size / process_count rows); the global array's
batch dimension is the concatenation over processes in process order.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from lmfusion_jax.sharding import batch_sharding


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """{field: numpy [local_batch, ...]} -> {field: jax.Array [global_batch, ...]} (batch-sharded)."""
  out = {}
  for name, value in host_batch.items():
    value = np.asarray(value)
    try:
      out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    except Exception as e:  # jax raises ValueError / TypeError / AssertionError for bad shapes
      raise ValueError(f"global_batch: field {name!r} with local shape {value.shape} cannot be sharded "
                       f"over mesh {dict(mesh.shape)} along ('data', 'fsdp'): {e}") from e
  return out
