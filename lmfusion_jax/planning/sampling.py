"""Ahead-of-time cost of image SAMPLING on a TPU slice, from a CPU-only host (the sampling counterpart of
planning.cost, which compiles the train step).

What is compiled is the real sampling code of `inference.sampler`, lowered from shapes only (nothing allocated)
and compiled for compile-only TPU devices (planning.topology):

  denoise   `sampler._denoise`: the jitted DDPM/DDIM chain `Sampler.denoise` runs, in which every step runs the
            image tokens only, through the image weights, against the cached caption prefix; with guidance the
            conditional and unconditional rows go through ONE model call (diffusion.guided_eps_fn). With
            num_steps=1 the program is exactly one denoising step (the chain's lax.scan has one trip, plus the
            initial noise draw); with num_steps=K it is the whole chain as `generate_images` runs it.
  prefill   `sampler._prefill_text`: `BOS caption BOI` (and `BOS BOI` for the unconditional rows, left-padded
            to the same length) through the text tower into the KV cache, once per batch of prompts.

Placement: parameters as `inference.loading.load_model` places them (and as training does): the logical-axis
rule table over the ("data", "fsdp", "tensor") mesh; rows (and the cache) split over data x fsdp (the
"batch" rule the model's activation constraints use).

Figures are read as planning.cost reads the train step's: memory from a compile with the model as configured
(scanned layers), FLOPs and the compiler's time estimate ("optimal_seconds") from compiles with the layers
unrolled (a scanned layer is counted once by cost_analysis), windowed einsums off: every layer unrolled
(forward-only programs compile fast enough for that: 2-5 minutes for the 8B denoising step on 2 cores), or
2 and 3 layers extrapolated per layer (program_cost's "scaled" mode, as `plan --cost scaled`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmfusion_jax import diffusion, sharding
from lmfusion_jax.inference import sampler as sampler_lib
from lmfusion_jax.models import decoder, sharded
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.planning.cost import COST_COMPILER_OPTIONS, _cost, _timed
from lmfusion_jax.planning.topology import PlanError

_BATCH = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class SamplingShape:
  """One batch of the sampling job: `prompts` images (global), each after a cached prefix of `prefix_len`
  slots; with guidance 2 x prompts rows (conditional, then unconditional)."""
  prompts: int
  prefix_len: int
  guided: bool = True
  sampler: str = "ddpm"

  @property
  def rows(self) -> int:
    return 2 * self.prompts if self.guided else self.prompts


def _sds(shape, dtype, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def _abstract_module(lcfg: LlamaConfig, fcfg: Optional[FusionConfig], mesh: Mesh, rules: Optional[dict] = None):
  """(graphdef, nnx.State of sharded ShapeDtypeStructs) of LMFusion (or of its text Llama when fcfg is None):
  what `nnx.split(model)` of a model loaded onto `mesh` holds. `rules` replaces the logical-axis rule table for
  the parameters' placement (default: lmfusion_jax.sharding.LOGICAL_RULES, as load_model and training use)."""
  graphdef, abstract = sharded.graphdef_and_abstract_state(lcfg, fcfg)
  shapes = nnx.to_pure_dict(abstract)
  shards = sharding.state_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shards)
  state = jax.tree.map(lambda x: x, abstract)       # fresh Variables (the cached state is read-only)
  nnx.replace_by_pure_dict(state, params)
  return graphdef, state


def abstract_cache(lcfg: LlamaConfig, rows: int, prefix_len: int, mesh: Mesh) -> decoder.KVCache:
  """The prefilled prefix cache (k/v [layers, rows, prefix_len, kv_heads, head_dim] in the compute dtype,
  TokenInfo [rows, prefix_len]), rows split over data x fsdp."""
  c = jax.eval_shape(lambda: decoder.empty_cache(lcfg, rows, prefix_len))
  kv = lambda a: _sds(a.shape, a.dtype, mesh, P(None, _BATCH))    # noqa: E731
  info = type(c.info)(*(_sds(a.shape, a.dtype, mesh, P(_BATCH)) for a in c.info))
  return decoder.KVCache(kv(c.k), kv(c.v), info)


def check_rows(shape: SamplingShape, mesh: Mesh) -> None:
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  if shape.rows % split:
    raise PlanError(f"sampling: {shape.rows} rows ({shape.prompts} prompts{' x 2 for guidance' if shape.guided else ''}) "
                    f"do not split over data x fsdp = {split} devices")


def lower_denoise(lcfg: LlamaConfig, fcfg: FusionConfig, dcfg: diffusion.DiffusionConfig, mesh: Mesh,
                  shape: SamplingShape, num_steps: int = 1, cfg_scale: float = 1.55, rules: Optional[dict] = None):
  """`sampler._denoise` (what `Sampler.denoise` / `generate_images` run) lowered for `mesh` from shapes only:
  `num_steps` denoising steps of `shape.rows` rows after a cached prefix of `shape.prefix_len` slots.
  `rules`: the parameters' placement, see _abstract_module."""
  check_rows(shape, mesh)
  sampler_lib.check_sampler(shape.sampler, num_steps, dcfg, 0.0)
  if shape.guided != sampler_lib.guided(cfg_scale):
    raise PlanError(f"sampling: guided={shape.guided} but cfg_scale={cfg_scale}")
  graphdef, state = _abstract_module(lcfg, fcfg, mesh, rules)
  cache = abstract_cache(lcfg, shape.rows, shape.prefix_len, mesh)
  positions = _sds((shape.rows,), jnp.int32, mesh, P(_BATCH))
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = _sds(key.shape, key.dtype, mesh, P())
  scalar = _sds((), jnp.float32, mesh, P())
  with jax.set_mesh(mesh):
    return sampler_lib._denoise.lower(graphdef, state, cache, positions, key, scalar, scalar, dcfg=dcfg,
                                      num_steps=num_steps, sampler=shape.sampler, is_guided=shape.guided,
                                      clip_x0=None)


def lower_prefill(lcfg: LlamaConfig, mesh: Mesh, shape: SamplingShape, rules: Optional[dict] = None):
  """`sampler._prefill_text` (Sampler.prefill_arrays: the caption prefixes through the text tower into a fresh
  cache of prefix_len slots) lowered for `mesh` from shapes only. `rules`: see _abstract_module."""
  check_rows(shape, mesh)
  graphdef, state = _abstract_module(lcfg, None, mesh, rules)
  tok = _sds((shape.rows, shape.prefix_len), jnp.int32, mesh, P(_BATCH))
  with jax.set_mesh(mesh):
    return sampler_lib._prefill_text.lower(graphdef, state, tok, tok, tok, cache_len=shape.prefix_len)


def compile_lowered(lowered, mesh: Mesh, compiler_options: Optional[dict] = None):
  with jax.set_mesh(mesh):
    return lowered.compile(compiler_options=compiler_options)


def memory(compiled) -> dict:
  """Per-device bytes from memory_analysis, and their sum (what must fit in HBM), as planning.plan counts it."""
  mem = compiled.memory_analysis()
  out = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["need"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def program_cost(lower_fn: Callable[[LlamaConfig], object], lcfg: LlamaConfig, mesh: Mesh, mode: str = "unrolled",
                 progress: Callable[[str], None] = lambda msg: None, what: str = "") -> dict:
  """Per-device cost figures of the program `lower_fn(lcfg')` with every layer counted (a scanned layer is
  counted once by cost_analysis), windowed einsums off, as planning.cost.step_cost reads the train step:
    "unrolled"  one compile with all lcfg.n_layers layers unrolled (exact);
    "scaled"    compiles with 2 and 3 layers unrolled, extrapolated linearly to lcfg.n_layers (all layers at
                or under 3: one unrolled compile of them all)."""
  def one(n):
    lowered = lower_fn(lcfg.replace(scan_layers=False, n_layers=n))
    c = _timed(progress, f"{what}: compiling {n} layers unrolled",
               lambda: compile_lowered(lowered, mesh, COST_COMPILER_OPTIONS))
    return _cost(c)

  if mode not in ("unrolled", "scaled"):
    raise PlanError(f"cost mode {mode!r}: expected 'unrolled' or 'scaled'")
  if mode == "unrolled" or lcfg.n_layers <= 3:
    c = one(lcfg.n_layers)
    return {**c, "per_layer_flops": None, "per_layer_seconds": None,
            "source": f"unrolled compile ({lcfg.n_layers} layers, windowed einsums off)"}
  c2, c3 = one(2), one(3)
  extra = lcfg.n_layers - 2
  out = {k: c2[k] + extra * (c3[k] - c2[k]) for k in ("flops", "bytes_accessed")}
  ok = c2["optimal_seconds"] is not None and c3["optimal_seconds"] is not None
  out["optimal_seconds"] = c2["optimal_seconds"] + extra * (c3["optimal_seconds"] - c2["optimal_seconds"]) if ok else None
  out["per_layer_flops"] = c3["flops"] - c2["flops"]
  out["per_layer_seconds"] = c3["optimal_seconds"] - c2["optimal_seconds"] if ok else None
  out["two_layer"], out["three_layer"] = c2, c3
  out["windowed_einsum_loops"] = c2["windowed_einsum_loops"] + c3["windowed_einsum_loops"]
  out["source"] = "unrolled 2- and 3-layer compiles (windowed einsums off), extrapolated per layer"
  return out


def denoise_step_flops(lcfg: LlamaConfig, fcfg: FusionConfig, rows: int, prefix_len: int,
                       io_flops_per_image: float) -> dict:
  """Analytic forward FLOPs of one denoising step over `rows` rows: every image token through the image layer
  weights (2 x weights), attention of the image tokens over prefix + image (QK^T and PV: 4 x q x k x heads x
  head_dim per layer, as the kernels compute it, padding slots included), and the image in/out modules."""
  n = fcfg.tokens_per_image
  weights = 2 * flops_lib.per_token_layer_weights(lcfg) * n * lcfg.n_layers
  attn = 4 * n * (prefix_len + n) * lcfg.n_heads * lcfg.head_dim * lcfg.n_layers
  per_row = weights + attn + io_flops_per_image
  return {"total": float(rows * per_row), "weights": float(rows * weights), "attention": float(rows * attn),
          "image_io": float(rows * io_flops_per_image)}


def prefill_flops(lcfg: LlamaConfig, rows: int, prefix_len: int) -> dict:
  """Analytic forward FLOPs of the prefix prefill: text layer weights and attention over prefix_len slots per
  row, and the LM head at the last slot (`_prefill_text` keeps only the last logits; the compiled program
  computes the head there only: its FLOPs match this count, not one with the head at every slot)."""
  weights = 2 * flops_lib.per_token_layer_weights(lcfg) * prefix_len * lcfg.n_layers
  attn = 4 * prefix_len * prefix_len * lcfg.n_heads * lcfg.head_dim * lcfg.n_layers
  head = 2 * lcfg.dim * lcfg.vocab_size
  return {"total": float(rows * (weights + attn + head)), "head": float(rows * head)}
