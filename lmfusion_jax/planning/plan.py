"""Ahead-of-time planning of a training run on a TPU pod slice, from a CPU-only host: `plan(cfg, topology)`.

With libtpu installed (the `tpu` extra), compile-only TPU devices of the topology (planning.topology) carry the
run's mesh; the train state and batch are ShapeDtypeStructs (nothing is allocated); the REAL train step is
lowered and compiled (planning.cost). The compiled program reports per-device memory (`memory_analysis`) and
cost (`cost_analysis`: flops, "optimal_seconds"). planning.report prints the result.

How the compiler's figures are read:
  memory  from the run's own compile (scanned layers are fine for memory).
  cost    from unrolled compiles with windowed einsums off (see planning.cost).
  MFU     model FLOPs / (step time x peak FLOP/s x chips), with the step time = the compiler's estimate.
          Two model-FLOPs conventions are reported (planning.flops has them written out):
            mfu_maxtext   MaxText's calculate_tflops_training_per_device (the reference trainer's own: every
                          token as a trained dense-Llama text token, causal attention halved),
            mfu_required  what the step must compute (4x weights for tokens whose weights are frozen, 6x for
                          trained ones, the LM head on text positions, the image in/out modules, causal
                          attention halved).
  hfu     the compiled program's FLOPs (what the kernels really run, the flash kernel's cost estimate
          included) / (step time x peak x chips).
  online  with data.encode="online" the VAE encoder's stage is compiled alone for the same mesh and batch
          (planning.encoder_cost) and reported next to the step: its time, and its share of step + encoder.
Every figure is an estimate of the TPU compiler on a CPU host, not a TPU measurement.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.planning.cost import (_out_of_memory_temp_bytes, _timed, cost_inconsistency, lower_train_step,
                                        step_cost)
from lmfusion_jax.planning.topology import PlanError, make_plan_mesh, parse_topology, topology_devices
from lmfusion_jax.run_config import model_configs
from lmfusion_jax.training import optimizer as optim


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
  mfu_maxtext: Optional[float]
  mfu_required: Optional[float]
  hfu: Optional[float]
  peak_flops_per_chip: float
  cost_source: str
  compiler_message: str = ""   # the compiler's out-of-memory error, when it refused the program
  per_layer_seconds: Optional[float] = None   # "scaled" cost: one more layer's share of the step estimate
  per_layer_flops: Optional[float] = None     # ... and of the FLOPs (per device)
  n_layers: int = 0
  cost_warning: str = ""       # set when the cost figures fail the sanity check (then no time / MFU)
  encoder: Optional[dict] = None   # data.encode="online": planning.encoder_cost.encoder_cost's figures

  @property
  def encoder_share(self) -> Optional[float]:
    """The online encoder's estimated share of (train step + encoder) time."""
    e = (self.encoder or {}).get("seconds")
    return e / (e + self.step_time_s) if (e and self.step_time_s) else None

  @property
  def fits(self) -> bool:
    return not self.compiler_message and self.hbm_need_bytes <= self.hbm_capacity_bytes

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "fits": self.fits, "encoder_share": self.encoder_share}


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
  encoder = None
  if cfg.data.get("encode", "precomputed") == "online":   # first: a latent-shape mismatch fails fast
    from lmfusion_jax.planning.encoder_cost import encoder_cost
    encoder = encoder_cost(cfg, mesh, fcfg, progress)
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
  io = flops_lib.image_io_flops_per_image(lcfg, fcfg) if cfg.data.image_slots else 0.0
  mflops = flops_lib.model_flops(lcfg, fcfg, cfg.data, text_trainable, io)
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
      tokens_per_s=tokens / step_s if step_s else None, mfu_maxtext=util(mflops["maxtext"]),
      mfu_required=util(mflops["required"]), hfu=util(compiled_flops),
      peak_flops_per_chip=peak, cost_source=cost["source"], compiler_message=compiler_message,
      per_layer_seconds=cost.get("per_layer_seconds"), per_layer_flops=cost.get("per_layer_flops"),
      n_layers=lcfg.n_layers, cost_warning=cost_warning, encoder=encoder)


