"""The one place the model is built abstractly or sharded: restore targets, shardings, sharded init, and the
module around a params dict.

Every parameter's logical axis names come from nnx metadata and one rule table maps them onto the mesh
(lmfusion_jax.sharding). A params dict is {"text": ..., "image": ...} for LMFusion, {"text": ...} for a plain
Llama (`fcfg=None`): the same tree a params checkpoint stores.

  abstract_state(lcfg, fcfg)           nnx.State of ShapeDtypeStructs (logical names as metadata)
  abstract_params(lcfg, fcfg, mesh)    pure dict of ShapeDtypeStructs (sharded on `mesh`): a restore target
  model_shardings(lcfg, fcfg, mesh)    pure dict of NamedShardings
  init_sharded(lcfg, fcfg, mesh)       parameters created directly in their sharding
  model(lcfg, fcfg, params)            the LMFusion (or Llama) module holding `params`; works inside jit
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from lmfusion_jax import sharding
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.fusion import LMFusion
from lmfusion_jax.models.llama import Llama
from lmfusion_jax.models.params import abstract_split


@functools.lru_cache(maxsize=16)
def graphdef_and_abstract_state(lcfg: LlamaConfig, fcfg: Optional[FusionConfig] = None):
  """(graphdef, abstract nnx.State) of LMFusion, or of a Llama when `fcfg` is None; nothing is allocated.
  Cached: treat as read-only."""
  if fcfg is None:
    return abstract_split(lambda: Llama(lcfg, rngs=nnx.Rngs(0)))
  return abstract_split(lambda: LMFusion(lcfg, fcfg.replace(image_init="random"), rngs=nnx.Rngs(0)))


def abstract_state(lcfg: LlamaConfig, fcfg: Optional[FusionConfig] = None) -> nnx.State:
  """Abstract nnx.State {"text": ..., ["image": ...]} (ShapeDtypeStruct leaves, logical-name metadata)."""
  _, state = graphdef_and_abstract_state(lcfg, fcfg)
  return state if fcfg is not None else nnx.State({"text": state})


def model_shardings(lcfg: LlamaConfig, fcfg: Optional[FusionConfig], mesh: Mesh, rules=None) -> dict:
  """Pure dict {text: ..., [image: ...]} of NamedShardings, one per parameter."""
  return sharding.state_shardings(abstract_state(lcfg, fcfg), mesh, rules)


def logical_names(lcfg: LlamaConfig, fcfg: Optional[FusionConfig]) -> dict:
  return sharding.param_logical_names(abstract_state(lcfg, fcfg))


def abstract_params(lcfg: LlamaConfig, fcfg: Optional[FusionConfig], mesh: Mesh | None = None) -> dict:
  """Pure dict of ShapeDtypeStructs (with shardings when a mesh is given): a restore target."""
  abstract = abstract_state(lcfg, fcfg)
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


def merge(graphdef, abstract, params: dict):
  """Rebuilds the module from a pure params dict. Works inside jit (pure restructuring)."""
  state = jax.tree.map(lambda x: x, abstract)  # fresh Variables, same metadata
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def model(lcfg: LlamaConfig, fcfg: Optional[FusionConfig], params: dict):
  """The LMFusion module holding `params` ({"text", "image"}), or the Llama holding params["text"] when
  `fcfg` is None."""
  graphdef, abstract = graphdef_and_abstract_state(lcfg, fcfg)
  params = jax.tree.map(jnp.asarray, params if fcfg is not None else params["text"])
  return merge(graphdef, abstract, params)
