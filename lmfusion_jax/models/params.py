"""Creating parameters with logical axis names (nnx.Param `out_sharding` metadata, no eager sharding)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, names: Sequence[str]) -> nnx.Param:
  if len(names) != value.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match shape {value.shape}")
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def ones(shape, dtype) -> jax.Array:
  return jnp.ones(shape, dtype)


def zeros(shape, dtype) -> jax.Array:
  return jnp.zeros(shape, dtype)


def abstract_split(ctor):
  """(graphdef, State of ShapeDtypeStructs) of the module `ctor()` builds, allocating nothing.

  Unlike nnx.eval_shape, an active mesh does not turn the logical `out_sharding` names into mesh axes;
  shardings come from lmfusion_jax.sharding's rule table only."""
  from flax import nnx as _nnx
  return jax.eval_shape(lambda: _nnx.split(ctor()))
