"""TPU slices for planning: the generation table (HBM, chip layout), topology names -> chip grids, compile-only
TPU devices from libtpu (no TPU needed), and the run's mesh over them.

Topology names: v4-N and v5p-N count TensorCores (2 per chip, run as one "megacore" device: N/2 chips);
v5e-N (gcloud: v5litepod-N) and v6e-N count chips (1 core each). An explicit chip grid is also accepted:
"v5p:4x4x12", "v5e:8x16".
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np
from jax.sharding import AxisType, Mesh

from lmfusion_jax import sharding
from lmfusion_jax.errors import UserError

GIB = 2 ** 30


class PlanError(UserError):
  """The topology or the run config cannot be planned; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Generation:
  libtpu_name: str          # the prefix libtpu's topology names use
  grid_dims: int            # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  cores_per_chip_in_name: int
  chip_config: str          # "megacore": the chip's 2 TensorCores are one device
  hbm_bytes: int            # HBM per chip


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32 * GIB),
    "v5p": Generation("v5", 3, 2, "megacore", 95 * GIB),
    "v5e": Generation("v5e", 2, 1, "default", 16 * GIB),
    "v6e": Generation("v6e", 2, 1, "default", 32 * GIB),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  name: str                 # as the user wrote it
  generation: str           # v4 | v5p | v5e | v6e
  chip_grid: tuple          # chips per dimension of one slice
  libtpu_topology: str      # e.g. "v5:4x4x4"
  chip_config: str
  wrap: tuple               # torus wrap-around per dimension (x, y, z)
  hbm_bytes: int

  @property
  def chips(self) -> int:
    return int(np.prod(self.chip_grid))


def default_chip_grid(chips: int, dims: int) -> tuple:
  """The standard slice shape for a power-of-two chip count: 2x2(x2) grown by doubling the last smallest
  dimension (v5p: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, 128 -> 4x4x8;
  v5e/v6e: 1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, 64 -> 8x8, 128 -> 8x16, 256 -> 16x16)."""
  if chips == 1 and dims == 2:
    return (1, 1)
  if chips == 4 and dims == 3:
    return (2, 2, 1)
  grid = [2] * dims
  if chips < 2 ** dims or chips & (chips - 1):
    raise PlanError(f"{chips} chips: not a standard {dims}-D slice size (use an explicit grid such as "
                    f"'v5p:4x4x12' or 'v5e:8x16')")
  while int(np.prod(grid)) < chips:
    smallest = min(grid)
    i = max(j for j, g in enumerate(grid) if g == smallest)
    grid[i] *= 2
  return tuple(grid)


def _wrap(gen: Generation, grid: tuple) -> tuple:
  """Torus links: v4/v5p slices of whole 4x4x4 cubes wrap in every dimension; v5e/v6e wrap a 16-chip side."""
  if gen.grid_dims == 3:
    full = all(g % 4 == 0 for g in grid)
    return (full, full, full)
  return tuple(g == 16 for g in grid) + (False,)


def parse_topology(name: str) -> TopologySpec:
  """'v5p-128' (TensorCores) / 'v5e-16' / 'v5litepod-16' / 'v6e-64' (chips) / 'v5p:4x4x12' (chip grid)."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  if not m:
    raise PlanError(f"topology {name!r}: expected e.g. v5p-128, v4-64, v5e-256, v6e-64 or v5p:4x4x8")
  gen_name = _ALIASES.get(m.group(1), m.group(1))
  if gen_name not in GENERATIONS:
    raise PlanError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {sorted(GENERATIONS)})")
  gen = GENERATIONS[gen_name]
  if m.group(2):
    count = int(m.group(2))
    if count % gen.cores_per_chip_in_name:
      raise PlanError(f"topology {name!r}: {gen_name}-N counts TensorCores ({gen.cores_per_chip_in_name} per "
                      f"chip), so N must be even")
    grid = default_chip_grid(count // gen.cores_per_chip_in_name, gen.grid_dims)
  else:
    grid = tuple(int(x) for x in m.group(3).split("x"))
    if len(grid) == 3 and gen.grid_dims == 2 and grid[2] == 1:
      grid = grid[:2]
    if len(grid) != gen.grid_dims or min(grid) < 1:
      raise PlanError(f"topology {name!r}: {gen_name} slices are {gen.grid_dims}-D chip grids")
  topo = f"{gen.libtpu_name}:{'x'.join(str(g) for g in grid)}"
  return TopologySpec(name, gen_name, grid, topo, gen.chip_config, _wrap(gen, grid), gen.hbm_bytes)


def topology_devices(topo: TopologySpec, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices of `topo` (needs libtpu; no TPU needed)."""
  from jax.experimental import topologies
  # Compile-only use claims no chips: let several planners (and test processes) load libtpu at once
  # instead of failing on libtpu's single-process lockfile. Only read when libtpu first loads.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kw = dict(chip_config_name=topo.chip_config, wrap=topo.wrap)
  if topo.chips == 1:
    kw["chips_per_host_bounds"] = (1, 1, 1)
  if num_slices > 1:
    kw["num_slices"] = num_slices
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_topology, **kw)
  except Exception as e:  # no libtpu, or a grid libtpu rejects
    raise PlanError(f"cannot build TPU topology {topo.libtpu_topology} ({topo.name}): {e}. `plan` needs "
                    f"libtpu: pip install '.[tpu]' (or 'libtpu==0.0.42.*')") from e
  return list(desc.devices)


def make_plan_mesh(mesh_cfg, devices: Sequence, num_slices: int = 1) -> Mesh:
  """The config's ("data", "fsdp", "tensor") mesh over the topology's devices. Across slices (DCN) only
  the data axis is split: data must be a multiple of num_slices."""
  try:
    sizes = sharding.mesh_sizes(int(mesh_cfg.get("data", 1)), int(mesh_cfg.get("fsdp", -1)),
                                int(mesh_cfg.get("tensor", 1)), len(devices))
  except ValueError as e:
    raise PlanError(f"{e} (set --config.mesh.*)") from e
  if num_slices == 1:
    return sharding.make_mesh(*sizes, devices=devices)
  if sizes[0] % num_slices:
    raise PlanError(f"--num-slices {num_slices}: mesh.data={sizes[0]} must be a multiple of the slice count "
                    f"(data parallelism runs across slices over DCN); set --config.mesh.data={num_slices}")
  from jax.experimental import mesh_utils
  ici = (sizes[0] // num_slices, sizes[1], sizes[2])
  arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
  return Mesh(arr, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


