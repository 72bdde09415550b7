"""Device mesh over ("data", "fsdp", "tensor") and the logical-axis rule table.

Every parameter carries logical axis names (`out_sharding` metadata on its nnx.Param); one short rule
table maps them to mesh axes. Activations are constrained with the same names.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmfusion_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Order is irrelevant: one entry a name.
LOGICAL_RULES: dict = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "conv_h": None,
    "conv_w": None,
    "conv_in": None,
    "conv_out": ("tensor", "fsdp"),  # U-Net output channels: the 0.27B U-Net is not replicated per chip
    "patch": None,
    "time": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh; one axis may be -1 (= the remaining devices).

  Axes are `AxisType.Auto` (GSPMD propagation), explicitly: jax.make_mesh defaults to explicit axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(data, fsdp, tensor, len(devices))
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # non-TPU or unusual topologies: plain row-major order
    dev_array = np.asarray(devices).reshape(sizes)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_sizes(data: int, fsdp: int, tensor: int, n_devices: int) -> list:
  """[data, fsdp, tensor] with one -1 resolved to the remaining devices; raises ValueError when the sizes do not
  use exactly `n_devices` devices."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise UserError(f"mesh: {n_devices} devices are not divisible by data*fsdp*tensor={known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise UserError(f"mesh: data*fsdp*tensor = {sizes} needs {int(np.prod(sizes))} devices, "
                     f"but {n_devices} are available")
  return sizes


def mesh_from_config(mesh_cfg) -> Mesh:
  return make_mesh(data=mesh_cfg.get("data", 1), fsdp=mesh_cfg.get("fsdp", -1),
                   tensor=mesh_cfg.get("tensor", 1))


def logical_to_spec(names: Optional[Sequence[Optional[str]]], mesh: Optional[Mesh] = None,
                    rules: Optional[dict] = None, shape: Optional[Sequence[int]] = None) -> P:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once per spec; with `mesh` and `shape`, an axis that does not divide the
  dimension (e.g. a vocab of 10 over tensor=4) is dropped so the tensor is replicated there instead.
  """
  if names is None:
    return P()
  rules = LOGICAL_RULES if rules is None else rules
  used = set()
  out = []
  for i, name in enumerate(names):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
    axes = rules[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    keep = []
    for a in axes:
      if a in used:
        continue
      if mesh is not None and shape is not None:
        size = int(np.prod([mesh.shape[x] for x in keep + [a]]))
        if shape[i] % size:
          continue
      keep.append(a)
    used.update(keep)
    out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
  return P(*out)


def param_logical_names(state: nnx.State):
  """Pytree (pure dict) of logical-name tuples, one per parameter, read from nnx metadata."""
  def names(v):
    return tuple(v.get_metadata().get("out_sharding") or ())
  return nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Optional[dict] = None):
  """NamedSharding per leaf of an (abstract) nnx.State, as a pure dict of the same structure."""
  def one(v):
    names = v.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, v.value.shape))
  return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(tree, logical_tree, mesh: Mesh, rules: Optional[dict] = None):
  """Shardings for a pure-dict pytree of arrays given a matching pytree of logical-name tuples."""
  return jax.tree.map(lambda x, n: NamedSharding(mesh, logical_to_spec(n, mesh, rules, x.shape)),
                      tree, logical_tree, is_leaf=lambda x: isinstance(x, tuple))


def constrain(x: jax.Array, names: Sequence[Optional[str]], rules: Optional[dict] = None) -> jax.Array:
  """with_sharding_constraint by logical names, when tracing under a mesh; a no-op otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, mesh, rules, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Inputs are sharded along the batch dimension over data x fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))
