"""Ahead-of-time planning of a training run on a TPU pod slice, from a CPU-only host.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` gives compile-only TPU devices for a
named topology. We build the run's mesh over them, the train state and batch as ShapeDtypeStructs (nothing
is allocated), and lower + compile the REAL train step (`train_step.jit_train_step`). The compiled program
reports per-device memory (`memory_analysis`) and cost (`cost_analysis`: flops, "optimal_seconds").

How the compiler's figures are read:
  memory  from the run's own compile (scanned layers are fine for memory).
  cost    a scanned loop body is counted ONCE, so cost figures come from unrolled compiles: either the full
          unrolled model (cost_mode="unrolled", exact, slow for 8B) or the model unrolled at 2
          and 3 layers and extrapolated linearly, c(L) = c(2) + (L - 2) * (c(3) - c(2)) (cost_mode="scaled",
          fast; every layer is the same program, so FLOPs are exact and the time estimate close; shown to
          agree in tests and benchmarks/plan_table.py).
          The compiler makes loops of its own that are counted once too: at large per-chip activations the
          SPMD partitioner turns FSDP matmuls and convolutions into windowed einsums ("collective matmuls",
          a loop that rotates weight shards, up to #devices trips; seen at 8 rows of 4096 tokens per v5p
          chip, where they hid ~1/3 of the step's FLOPs). Cost compiles are therefore built with windowed
          einsums off (COST_COMPILER_OPTIONS): the same math as plain all-gather / reduce-scatter + matmul,
          every FLOP counted; the time estimate is then that of the program without windowed einsums (the
          cost model cannot price their loop; the real program keeps them where the compiler judges them
          faster). A cost compile that still holds such a loop is flagged (cost_warning; no step time or
          MFU reported), and so are cost figures under the analytic FLOPs the step must compute.
  MFU     model FLOPs / (step time x peak FLOP/s x chips), with the step time = the compiler's estimate.
          Two model-FLOPs conventions are reported:
            "6ND+attn": 6 x active params x tokens + attention (the usual convention; every token counted as
                        if all its weights were trained),
            "required": what the step must compute (lmfusion_jax.planning.flops: 4x weights for tokens whose weights
                        are frozen, 6x for trained ones, + attention + U-Net), never more than 6ND+attn.
          Attention is counted over the full S x S score matrix, as the XLA reference kernel computes it.

Topology names: v4-N and v5p-N count TensorCores (2 per chip, run as one "megacore" device: N/2 chips);
v5e-N (gcloud: v5litepod-N) and v6e-N count chips (1 core each). An explicit chip grid is also accepted:
"v5p:4x4x12", "v5e:8x16".
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax import sharding
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts
from lmfusion_jax.data import batch as batch_lib
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.run_config import model_configs

GIB = 2 ** 30


class PlanError(ValueError):
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


def resolve_mesh_sizes(mesh_cfg, n_devices: int) -> tuple:
  sizes = [int(mesh_cfg.get("data", 1)), int(mesh_cfg.get("fsdp", -1)), int(mesh_cfg.get("tensor", 1))]
  if sizes.count(-1) > 1:
    raise PlanError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise PlanError(f"mesh {sizes}: {n_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise PlanError(f"mesh data*fsdp*tensor = {sizes} needs {int(np.prod(sizes))} devices; the topology has "
                    f"{n_devices} (set --config.mesh.*)")
  return tuple(sizes)


def make_plan_mesh(mesh_cfg, devices: Sequence, num_slices: int = 1) -> Mesh:
  """The config's ("data", "fsdp", "tensor") mesh over the topology's devices. Across slices (DCN) only
  the data axis is split: data must be a multiple of num_slices."""
  sizes = resolve_mesh_sizes(mesh_cfg, len(devices))
  if num_slices == 1:
    return sharding.make_mesh(*sizes, devices=devices)
  if sizes[0] % num_slices:
    raise PlanError(f"--num-slices {num_slices}: mesh.data={sizes[0]} must be a multiple of the slice count "
                    f"(data parallelism runs across slices over DCN); set --config.mesh.data={num_slices}")
  from jax.experimental import mesh_utils
  ici = (sizes[0] // num_slices, sizes[1], sizes[2])
  arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
  return Mesh(arr, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def abstract_batch(data_cfg, fcfg: FusionConfig, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of one global batch (see data/batch.py), sharded over data x fsdp."""
  b, t, i = int(data_cfg.global_batch_size), int(data_cfg.text_len), int(data_cfg.image_slots)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if b % rows:
    raise PlanError(f"data.global_batch_size={b} is not divisible by the batch-sharding mesh axes "
                    f"data*fsdp={rows}")
  h, c = fcfg.latent_size, fcfg.latent_channels
  shapes = {"tokens": ((b, t), jnp.int32), "text_positions": ((b, t), jnp.int32),
            "text_segment_ids": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32),
            "loss_mask": ((b, t), jnp.float32), "latents": ((b, i, h, h, c), jnp.float32),
            "image_positions": ((b, i), jnp.int32), "image_segment_ids": ((b, i), jnp.int32),
            "image_first": ((b, i), jnp.bool_)}
  assert set(shapes) == set(batch_lib.KEYS)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def lower_train_step(cfg, mesh: Mesh, lcfg: Optional[LlamaConfig] = None):
  """(lowered train step, abstract state, abstract batch) of the run `cfg` on `mesh`, from shapes only: the
  real train step as the training loop jits it (`train_step.jit_train_step`: explicit state/batch
  shardings, state donated). `lcfg` replaces the config's model (the unrolled cost compiles)."""
  cfg_l, fcfg, dcfg = model_configs(cfg)
  lcfg = lcfg or cfg_l
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(cfg.optim), int(cfg.optim.accum_steps))
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps)
  state = ts.abstract_state(spec, tx, mesh)
  batch = abstract_batch(cfg.data, fcfg, mesh)
  step = ts.jit_train_step(spec, tx, mesh, batch, optim.schedules(cfg.optim, cfg.total_steps))
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch)
  return lowered, state, batch


# Compiler options of the cost compiles (see the module docstring): no windowed-einsum loops.
COST_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_train_step(cfg, mesh: Mesh, lcfg: Optional[LlamaConfig] = None,
                       compiler_options: Optional[dict] = None):
  """(compiled train step, abstract state); see lower_train_step."""
  lowered, state, _ = lower_train_step(cfg, mesh, lcfg)
  with jax.set_mesh(mesh):
    return lowered.compile(compiler_options=compiler_options), state


def windowed_einsum_loops(hlo_text: str) -> int:
  """Windowed-einsum loops in a compiled program (the SPMD partitioner names their condition
  `windowed_dot_general_cond_*`): cost_analysis counts their body once."""
  return len(re.findall(r"condition=%?[\w.\-]*windowed_dot_general_cond", hlo_text))


_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _out_of_memory_temp_bytes(message: str) -> Optional[int]:
  """The temporaries size from the TPU compiler's out-of-HBM error, e.g. '... HLO temporaries (20.81G)'."""
  m = _OOM.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)])


def _cost(compiled) -> dict:
  """Per-device cost figures of a compiled step. libtpu 0.0.42's estimate charges -1 s for every
  `ConcatBitcast` custom call (they appear in unrolled compiles, stacking per-layer weight gradients): we
  add those seconds back and keep the raw figure."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  ca = ca or {}
  hlo_text = compiled.as_text()     # large for an unrolled 8B step: rendered once
  raw = ca.get("optimal_seconds")
  seconds = raw
  if raw is not None:
    n_unknown = hlo_text.count('custom_call_target="ConcatBitcast"')
    seconds = raw + n_unknown if raw < 0 else raw
    if seconds <= 0:
      seconds = None
  return {"flops": float(ca.get("flops", 0.0)), "optimal_seconds": seconds, "optimal_seconds_raw": raw,
          "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
          "windowed_einsum_loops": windowed_einsum_loops(hlo_text)}


def _timed(progress: Callable[[str], None], what: str, fn):
  t0 = time.time()
  progress(f"{what} ...")
  out = fn()
  progress(f"{what}: {time.time() - t0:.0f} s")
  return out


def step_cost(cfg, mesh: Mesh, mode: str = "scaled", compiled=None,
              progress: Callable[[str], None] = lambda msg: None) -> dict:
  """Per-device cost figures of one step with every layer counted (see the module docstring). "scaled"
  extrapolates from unrolled 2- and 3-layer compiles (a 1-layer compile lacks the cross-layer weight
  stacking every deeper model has)."""
  lcfg, _, _ = model_configs(cfg)

  def cost_compile(what, model):
    c, _ = _timed(progress, f"cost: compiling {what}",
                  lambda: compile_train_step(cfg, mesh, model, COST_COMPILER_OPTIONS))
    return _cost(c)

  if mode == "none":
    return {"flops": None, "optimal_seconds": None, "bytes_accessed": None, "windowed_einsum_loops": 0,
            "source": "not computed"}
  if not lcfg.scan_layers and compiled is not None:
    own = _cost(compiled)
    if not own["windowed_einsum_loops"]:
      return {**own, "source": "the run's compile (layers unrolled)"}
    return {**cost_compile("the step without windowed einsums", lcfg),
            "source": "the run's step compiled without windowed einsums (layers unrolled)"}
  if mode == "unrolled" or (mode == "scaled" and lcfg.n_layers <= 3):
    return {**cost_compile(f"all {lcfg.n_layers} layers unrolled", lcfg.replace(scan_layers=False)),
            "source": f"unrolled compile ({lcfg.n_layers} layers, windowed einsums off)"}
  if mode == "scaled":
    c2, c3 = (cost_compile(f"{n} layers unrolled", lcfg.replace(scan_layers=False, n_layers=n)) for n in (2, 3))
    extra = lcfg.n_layers - 2
    out = {k: c2[k] + extra * (c3[k] - c2[k]) for k in ("flops", "bytes_accessed")}
    out["windowed_einsum_loops"] = c2["windowed_einsum_loops"] + c3["windowed_einsum_loops"]
    if c2["optimal_seconds"] is not None and c3["optimal_seconds"] is not None:
      out["optimal_seconds"] = c2["optimal_seconds"] + extra * (c3["optimal_seconds"] - c2["optimal_seconds"])
    else:
      out["optimal_seconds"] = None
    out["per_layer_flops"] = c3["flops"] - c2["flops"]
    out["per_layer_seconds"] = (None if out["optimal_seconds"] is None
                                else c3["optimal_seconds"] - c2["optimal_seconds"])
    out["source"] = "unrolled 2- and 3-layer compiles (windowed einsums off), extrapolated per layer"
    return out
  raise PlanError(f"cost mode {mode!r}: expected 'scaled', 'unrolled' or 'none'")


def image_io_flops_per_image(lcfg: LlamaConfig, fcfg: FusionConfig) -> float:
  """Forward FLOPs of the image in/out modules (U-Net down + up, or linear patchify) for one image, from
  XLA's cost analysis of the lowered module (CPU, nothing allocated)."""
  from flax import nnx
  from lmfusion_jax.models.image_io import make_image_io
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_image_io(lcfg, fcfg, rngs=nnx.Rngs(0))))
  dtype = lcfg.jnp_dtype

  def fwd(state, latents, t):
    io = nnx.merge(graphdef, state)
    tokens, skips, temb = io.encode(latents, t, dtype)
    return io.decode(tokens, skips, temb)

  lat = jax.ShapeDtypeStruct((1, fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    ca = jax.jit(fwd).lower(state, lat, t).cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float((ca or {}).get("flops", 0.0))


def model_flops(lcfg: LlamaConfig, fcfg: FusionConfig, data_cfg, text_trainable: bool,
                io_flops_per_image: float = 0.0) -> dict:
  """Model FLOPs of one step under both conventions (see the module docstring)."""
  b, t, i = int(data_cfg.global_batch_size), int(data_cfg.text_len), int(data_cfg.image_slots)
  n_img = i * fcfg.tokens_per_image
  required = flops_lib.train_step_flops(lcfg, fcfg, b, t, i, text_trainable, io_flops_per_image)
  w_layer = flops_lib.per_token_layer_weights(lcfg)
  active_text = lcfg.n_layers * w_layer + lcfg.dim * lcfg.vocab_size   # layers + LM head
  active_image = lcfg.n_layers * w_layer
  six_nd = 6 * b * (active_text * t + active_image * n_img)
  six_nd_attn = six_nd + required["attention"] + 3 * b * i * io_flops_per_image
  return {"required": float(required["total"]), "six_nd": float(six_nd), "six_nd_attn": float(six_nd_attn),
          "attention": float(required["attention"]), "active_params_text_token": active_text,
          "active_params_image_token": active_image}


def cost_inconsistency(compiled_flops: Optional[float], required_flops: float, tolerance: float = 0.95,
                       windowed_einsum_loops: int = 0) -> str:
  """Sanity checks of the cost figures; returns the message when they cannot be trusted, else "".
  1. The cost compiles hold windowed-einsum loops: their bodies are counted once.
  2. A compiled step cannot do less work than the analytic count of what it must compute (that count leaves
     out remat recomputation and kernel overheads, so it is a lower bound)."""
  if windowed_einsum_loops:
    return (f"cost figures unreliable: the cost compiles hold {windowed_einsum_loops} windowed-einsum "
            f"loop(s), whose bodies the compiler's cost analysis counts once (no step time or MFU reported)")
  if compiled_flops is None or compiled_flops >= tolerance * required_flops:
    return ""
  return (f"cost figures inconsistent: the compiled step counts {compiled_flops:.4g} FLOPs, below the "
          f"{required_flops:.4g} the step must compute (no step time or MFU reported)")


def _per_device_bytes(tree) -> int:
  def one(x):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return int(sum(one(x) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class PlanReport:
  topology: str
  libtpu_topology: str
  num_slices: int
  chips: int
  device_kind: str
  mesh: dict
  global_batch: int
  tokens_per_step: int
  hbm_capacity_bytes: int
  hbm_need_bytes: int
  memory: dict              # argument / output / alias / temp / generated code bytes per device
  param_bytes_per_device: int
  opt_state_bytes_per_device: int
  compiled_flops_per_step: Optional[float]    # all devices
  model_flops: dict
  step_time_s: Optional[float]
  tokens_per_s: Optional[float]
  mfu_6nd_attn: Optional[float]
  mfu_required: Optional[float]
  hardware_flops_utilization: Optional[float]
  peak_flops_per_chip: float
  cost_source: str
  compiler_message: str = ""   # the compiler's out-of-memory error, when it refused the program
  per_layer_seconds: Optional[float] = None   # "scaled" cost: one more layer's share of the step estimate
  per_layer_flops: Optional[float] = None     # ... and of the FLOPs (per device)
  n_layers: int = 0
  cost_warning: str = ""       # set when the cost figures fail the sanity check (then no time / MFU)

  @property
  def fits(self) -> bool:
    return not self.compiler_message and self.hbm_need_bytes <= self.hbm_capacity_bytes

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "fits": self.fits}


def plan(cfg, topology: str, num_slices: int = 1, cost_mode: str = "scaled",
         progress: Callable[[str], None] = lambda msg: None) -> PlanReport:
  """Compiles the run `cfg` for `num_slices` x `topology` and collects the figures (see PlanReport).
  `progress` receives one line per compile (what, and how long it took)."""
  if num_slices < 1:
    raise PlanError(f"--num-slices {num_slices}: must be >= 1")
  topo = parse_topology(topology)
  devices = topology_devices(topo, num_slices)
  mesh = make_plan_mesh(cfg.mesh, devices, num_slices)
  lcfg, fcfg, _ = model_configs(cfg)
  lowered, state, batch = _timed(progress, "lowering the train step", lambda: lower_train_step(cfg, mesh))
  compiler_message = ""
  try:
    with jax.set_mesh(mesh):
      compiled = _timed(progress, "compiling the train step (memory)", lowered.compile)
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses programs whose temporaries exceed HBM: that is a "does not fit" answer.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, compiler_message = None, str(e).splitlines()[0]
  if compiled is not None:
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
              for k in ("argument", "output", "alias", "temp", "generated_code")}
  else:
    args = _per_device_bytes(state) + _per_device_bytes(batch)
    temp = _out_of_memory_temp_bytes(compiler_message)
    memory = {"argument": args, "output": 0, "alias": 0, "generated_code": 0,
              "temp": temp if temp is not None else topo.hbm_bytes - args + 1}
  need = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
  n_dev = len(devices)
  fits = compiled is not None and need <= topo.hbm_bytes
  cost = step_cost(cfg, mesh, cost_mode, compiled, progress) if fits else step_cost(cfg, mesh, "none")
  text_trainable = "text" in optim.trainable_branches(cfg.optim)
  io = image_io_flops_per_image(lcfg, fcfg) if cfg.data.image_slots else 0.0
  mflops = model_flops(lcfg, fcfg, cfg.data, text_trainable, io)
  tokens = int(cfg.data.global_batch_size) * (int(cfg.data.text_len) +
                                              int(cfg.data.image_slots) * fcfg.tokens_per_image)
  peak = flops_lib.peak_flops_per_device(devices[0].device_kind)
  step_s = cost.get("optimal_seconds")
  compiled_flops = cost["flops"] * n_dev if cost.get("flops") is not None else None
  cost_warning = cost_inconsistency(compiled_flops, mflops["required"],
                                    windowed_einsum_loops=cost.get("windowed_einsum_loops", 0))
  if cost_warning:
    progress(cost_warning)
    step_s = None     # no step time / MFU from figures that cannot be right

  def util(f):
    return f / (step_s * peak * n_dev) if (step_s and peak and f is not None) else None

  return PlanReport(
      topology=topo.name, libtpu_topology=topo.libtpu_topology, num_slices=num_slices, chips=n_dev,
      device_kind=devices[0].device_kind, mesh=dict(mesh.shape), global_batch=int(cfg.data.global_batch_size),
      tokens_per_step=tokens, hbm_capacity_bytes=topo.hbm_bytes, hbm_need_bytes=need, memory=memory,
      param_bytes_per_device=_per_device_bytes(state["params"]),
      opt_state_bytes_per_device=_per_device_bytes(state["opt_state"]),
      compiled_flops_per_step=compiled_flops, model_flops=mflops, step_time_s=step_s,
      tokens_per_s=tokens / step_s if step_s else None, mfu_6nd_attn=util(mflops["six_nd_attn"]),
      mfu_required=util(mflops["required"]), hardware_flops_utilization=util(compiled_flops),
      peak_flops_per_chip=peak, cost_source=cost["source"], compiler_message=compiler_message,
      per_layer_seconds=cost.get("per_layer_seconds"), per_layer_flops=cost.get("per_layer_flops"),
      n_layers=lcfg.n_layers, cost_warning=cost_warning)


def _gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB" if abs(x) >= 0.1 * GIB else f"{x / 2 ** 20:.1f} MiB"


def _pct(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def format_report(r: PlanReport) -> str:
  m = r.memory
  lines = [
      f"plan: {r.topology} ({r.libtpu_topology}) x {r.num_slices} slice(s) = {r.chips} chips [{r.device_kind}], "
      f"mesh {r.mesh}",
      f"  batch: {r.global_batch} sequences, {r.tokens_per_step:,} tokens per step",
      f"  HBM per chip: need {_gib(r.hbm_need_bytes)} of {_gib(r.hbm_capacity_bytes)} "
      f"({r.hbm_need_bytes / r.hbm_capacity_bytes:.0%}) -> {'fits' if r.fits else 'DOES NOT FIT'}",
      f"    arguments {_gib(m['argument'])} + outputs {_gib(m['output'])} - aliased {_gib(m['alias'])} "
      f"+ temporaries {_gib(m['temp'])} + code {_gib(m['generated_code'])}",
      f"    parameters {_gib(r.param_bytes_per_device)}, optimizer state {_gib(r.opt_state_bytes_per_device)}"
      f" per chip",
  ]
  if r.compiler_message:
    lines.append(f"    (the TPU compiler refused the program: {r.compiler_message})")
  if r.cost_warning:
    lines.append(f"  WARNING: {r.cost_warning}")
  mf = r.model_flops
  if r.compiled_flops_per_step is not None:
    lines.append(f"  FLOPs per step: compiled {r.compiled_flops_per_step:.4g} ({r.cost_source}); model "
                 f"6ND+attn {mf['six_nd_attn']:.4g}, required {mf['required']:.4g} "
                 f"(attention {mf['attention']:.4g})")
  if r.step_time_s:
    lines.append(f"  step time (compiler estimate): {r.step_time_s:.3f} s -> {r.tokens_per_s:,.0f} tokens/s, "
                 f"{r.tokens_per_s / r.chips:,.0f} tokens/s/chip")
    if r.per_layer_seconds:
      layers = r.per_layer_seconds * r.n_layers
      lines.append(f"    of which the {r.n_layers} layers {layers:.3f} s ({r.per_layer_seconds * 1e3:.1f} ms each); the "
                   f"rest (embedding, LM head, loss, image in/out, optimizer) {r.step_time_s - layers:.3f} s")
    lines.append(f"  MFU estimate: {_pct(r.mfu_6nd_attn)} (6ND+attn), {_pct(r.mfu_required)} (required FLOPs);"
                 f" hardware FLOPs utilization {_pct(r.hardware_flops_utilization)} "
                 f"(peak {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip)")
  elif r.fits and not r.cost_warning:
    lines.append("  step time: the compiler gave no estimate for this target")
  return "\n".join(lines)


def not_fit_message(r: PlanReport) -> str:
  return (f"does not fit: the step needs {_gib(r.hbm_need_bytes)} of HBM per chip but a {r.topology} chip "
          f"has {_gib(r.hbm_capacity_bytes)} (temporaries {_gib(r.memory['temp'])}, parameters "
          f"{_gib(r.param_bytes_per_device)}, optimizer state {_gib(r.opt_state_bytes_per_device)}). "
          f"Lower data.global_batch_size (or raise optim.accum_steps), use model.remat_policy=full, shard "
          f"more (mesh.fsdp / mesh.tensor), or take a larger slice.")
