"""Building the LMFusion parameters directly sharded on a mesh (no unsharded copy is materialized).

`model_shardings` reads every parameter's logical axis names from nnx metadata and maps them with the
rule table; `init_sharded` runs the initializer under jit with those output shardings.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from lmfusion_jax import sharding
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.fusion import LMFusion, abstract_model


@functools.lru_cache(maxsize=16)
def graphdef_and_abstract_state(lcfg: LlamaConfig, fcfg: FusionConfig):
  """(graphdef, abstract nnx.State) of the model; no arrays are allocated. Cached: treat as read-only."""
  return nnx.split(abstract_model(lcfg, fcfg))


def model_shardings(lcfg: LlamaConfig, fcfg: FusionConfig, mesh: Mesh, rules=None) -> dict:
  """Pure dict {text: ..., image: ...} of NamedShardings, one per parameter."""
  _, abstract = graphdef_and_abstract_state(lcfg, fcfg)
  return sharding.state_shardings(abstract, mesh, rules)


def logical_names(lcfg: LlamaConfig, fcfg: FusionConfig) -> dict:
  _, abstract = graphdef_and_abstract_state(lcfg, fcfg)
  return sharding.param_logical_names(abstract)


def abstract_params(lcfg: LlamaConfig, fcfg: FusionConfig, mesh: Mesh | None = None) -> dict:
  """Pure dict of ShapeDtypeStructs (with shardings when a mesh is given): a restore target."""
  _, abstract = graphdef_and_abstract_state(lcfg, fcfg)
  shapes = nnx.to_pure_dict(abstract)
  if mesh is None:
    return shapes
  shard = sharding.state_shardings(abstract, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)


def init_sharded(lcfg: LlamaConfig, fcfg: FusionConfig, mesh: Mesh, seed: int = 0):
  """(graphdef, params pure dict) with every parameter created directly in its sharding."""
  graphdef, _ = graphdef_and_abstract_state(lcfg, fcfg)
  out_shardings = model_shardings(lcfg, fcfg, mesh)

  def init():
    return nnx.to_pure_dict(nnx.state(LMFusion(lcfg, fcfg, rngs=nnx.Rngs(seed))))

  with jax.set_mesh(mesh):
    params = jax.jit(init, out_shardings=out_shardings)()
  return graphdef, params


def merge(graphdef, abstract_state, params: dict) -> LMFusion:
  """Rebuilds the module from a pure params dict. Works inside jit (pure restructuring)."""
  state = jax.tree.map(lambda x: x, abstract_state)  # fresh Variables, same metadata
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
