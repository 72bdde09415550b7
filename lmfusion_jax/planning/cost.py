"""Cost figures of a train step from the TPU compiler: lowering and compiling the REAL train step
(`training.step.jit_train_step`) from shapes only, and reading its cost analysis.

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
"""
from __future__ import annotations

import re
import time
from typing import Callable, Optional

import jax
from jax.sharding import Mesh

from lmfusion_jax.data.batch import abstract_batch
from lmfusion_jax.inference.sampler import latent_shape
from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.planning.topology import PlanError
from lmfusion_jax.run_config import model_configs
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts


def plan_batch(data_cfg, fcfg, mesh: Mesh) -> dict:
  """The run's global batch as ShapeDtypeStructs (data.batch.abstract_batch), checked against the mesh."""
  b = int(data_cfg.global_batch_size)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if b % rows:
    raise PlanError(f"data.global_batch_size={b} is not divisible by the batch-sharding mesh axes "
                    f"data*fsdp={rows}")
  return abstract_batch(b, int(data_cfg.text_len), int(data_cfg.image_slots), latent_shape(fcfg), mesh)


def lower_train_step(cfg, mesh: Mesh, lcfg: Optional[LlamaConfig] = None):
  """(lowered train step, abstract state, abstract batch) of the run `cfg` on `mesh`, from shapes only: the
  real train step as the training loop jits it (`train_step.jit_train_step`: explicit state/batch
  shardings, state donated). `lcfg` replaces the config's model (the unrolled cost compiles)."""
  cfg_l, fcfg, dcfg = model_configs(cfg)
  lcfg = lcfg or cfg_l
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(cfg.optim), int(cfg.optim.accum_steps))
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps)
  state = ts.abstract_state(spec, tx, mesh)
  batch = plan_batch(cfg.data, fcfg, mesh)
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


