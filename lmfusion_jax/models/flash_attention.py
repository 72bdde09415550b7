"""A block-sparse Pallas TPU flash-attention kernel for the hybrid LMFusion mask, with its cost estimate.

Same contract as `attention.reference_attention` (grouped-query attention, fp32 softmax, a query with no
allowed key gets zeros) but the [q_len, k_len] mask and scores never reach HBM: the mask is rebuilt inside
each (block_q x block_k) tile from the per-token arrays (mask.TokenInfo):

  allowed(q, k) = seg_q == seg_k != 0  and  (pos_k <= pos_q  or  img_q == img_k >= 0)

Block sparsity (models/flash_blocks.py): before the kernels, per-block min / max of segment ids, positions
and image ids classify every tile as EMPTY (skipped: no compute, and its K/V (forward) or Q/dO (backward)
block index is remapped to the block fetched before it, so no DMA either, like splash attention's
data_next), FULL (computed without the per-element mask) or PARTIAL (masked per element). The tile kinds and
the remapped block indices reach the kernels as scalar-prefetch (SMEM) operands. The classification is
conservative (proved in flash_blocks.py), so values equal the dense computation's.

Forward: online softmax over key blocks, saving the log-sum-exp. Backward: one kernel per (batch, head)
walks key blocks (outer) x query blocks (inner), accumulates dK/dV for the key block and dQ for the whole
sequence in a VMEM-resident output block (so the scores are recomputed once, not twice). That block is
q_len x head_dim fp32, double-buffered: 4 MiB at 4096 x 128; sequences beyond ~16k tokens would exceed the
default scoped VMEM and need a separate dQ pass (the TPU compiler then refuses with a VMEM out-of-memory
error naming lmfusion_flash_bwd, at `plan` time, before any TPU is rented).

Cost estimate (the TPU compiler counts a Pallas kernel as zero flops and zero time without one;
flash_blocks.cost computes it):
  flops     per computed tile 4 (forward: QK^T, PV) or 10 (backward: QK^T, dV, dP, dK, dQ) x block_q x
            block_k x D, per head;
  exp/log   per computed tile block_q x block_k exp; the forward adds its per-tile online-softmax rescale
            exp and, per query block, the final log, both on [block_q, LANES] lane-replicated statistics;
  bytes     every block the grid fetches or writes back: the Pallas TPU pipeline moves a block each time
            its block index changes along the grid's row-major order (so the per-token metadata and K/V
            are re-read per head and per query block, Q/dO/lse/delta per key block), plus the SMEM operands.
            Megacore splitting of the "parallel" grid axes adds a few fetches at the split; not counted.
Which tiles are computed is data-dependent but the estimate must be static at trace time, so:
  * token info concrete at trace time (not a tracer: eager calls, or arrays closed over by a jitted
    function): the block masks are computed then, and the estimate is exact for what the grid does;
  * token info traced (always so in the model's jitted train step): the estimate of the dense grid (every
    tile computed) with its tile-proportional terms (flops, per-tile exps, the K/V or Q/dO block fetches)
    scaled by the caller's `tile_fraction`, the expected fraction of computed tiles for its layout
    (benchmarks/attention_kernel.py measures it for the 8B training layout); the default None = 1.0 is an
    upper bound (what model.attention_impl="flash" uses: models/attention.py passes no fraction).

Under a mesh the kernel runs per shard (shard_map): batch over ("data", "fsdp"), heads over "tensor".
`interpret=True` runs the same kernels on CPU (tests).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lmfusion_jax import sharding
from lmfusion_jax.models import flash_blocks as fb
from lmfusion_jax.models.mask import TokenInfo

LANES = 128          # TPU vector lanes: per-query statistics are kept lane-replicated [block_q, LANES]
SUBLANES = 8         # per-key metadata is stored [SUBLANES, k_len] (one row used)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b
_NN = (((1,), (0,)), ((), ()))   # a @ b


def _dot(a, b, dims):
  """fp32-accumulated matmul with the precision pinned per input dtype (bf16 inputs: one MXU pass; fp32
  inputs: full fp32), independent of jax_default_matmul_precision, which Mosaic would reject for bf16."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=(precision, precision), preferred_element_type=jnp.float32)


def _lanes(x, n: int):
  """[rows, LANES] lane-replicated -> [rows, n]."""
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  raise ValueError(f"flash attention: width {n} must be < {LANES} or a multiple of it")


def _tile_mask(qpos, qseg, qimg, kpos, kseg, kimg, block_k: int):
  """Boolean [block_q, block_k] from q metadata [block_q, LANES] and k metadata [SUBLANES, block_k]."""
  qp, qs, qi = (_lanes(x, block_k) for x in (qpos, qseg, qimg))
  kp, ks, ki = kpos[:1, :], kseg[:1, :], kimg[:1, :]
  same_doc = (qs == ks) & (ks != 0)
  return same_doc & ((kp <= qp) | ((qi == ki) & (qi >= 0)))


def _on_kind(kind, step):
  """Runs step(masked=False) on a FULL tile, step(masked=True) on a PARTIAL one, nothing on an EMPTY one."""
  @pl.when(kind == fb.FULL)
  def _full():
    step(False)

  @pl.when(kind == fb.PARTIAL)
  def _partial():
    step(True)


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(kind_ref, kidx_ref, qpos, qseg, qimg, kpos, kseg, kimg, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale: float, block_k: int, head_dim: int):
  del kidx_ref   # used by the index maps only
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nq, nk = pl.num_programs(2), pl.num_programs(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(masked: bool):
    s = _dot(q_ref[0, 0], k_ref[0, 0], _NT) * scale                  # [block_q, block_k]
    if masked:
      mask = _tile_mask(qpos[0], qseg[0], qimg[0], kpos[0], kseg[0], kimg[0], block_k)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]                                              # [block_q, LANES]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, LANES]
    p = jnp.exp(s - _lanes(m_new, block_k))                         # [block_q, block_k]
    if masked:
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    pv = _dot(p.astype(v_ref.dtype), v_ref[0, 0], _NN)
    acc_sc[...] = _lanes(alpha, head_dim) * acc_sc[...] + pv

  _on_kind(kind_ref[(b * nq + i) * nk + j], step)

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...]
    safe = jnp.where(l > 0.0, l, 1.0)
    o_ref[0, 0] = jnp.where(_lanes(l, head_dim) > 0.0, acc_sc[...] / _lanes(safe, head_dim),
                            0.0).astype(o_ref.dtype)
    lse_ref[0, 0] = m_sc[...] + jnp.log(safe)


# ---------------------------------------------------------------------------------------------- backward
def _bwd_kernel(kind_ref, qidx_ref, qpos, qseg, qimg, kpos, kseg, kimg, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dq_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale: float, block_q: int, block_k: int):
  del qidx_ref   # used by the index maps only
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nk, nq = pl.num_programs(2), pl.num_programs(3)

  @pl.when(i == 0)
  def _init_kv():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  q_rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)

  @pl.when(j == 0)
  def _init_q():   # every query block's dQ rows, whether or not its first tile is computed
    dq_ref[0, 0, q_rows, :] = jnp.zeros((block_q, dq_ref.shape[-1]), jnp.float32)

  def step(masked: bool):
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    s = _dot(q, k, _NT) * scale
    p = jnp.exp(s - _lanes(lse_ref[0, 0], block_k))                 # [block_q, block_k]
    if masked:
      p = jnp.where(_tile_mask(qpos[0], qseg[0], qimg[0], kpos[0], kseg[0], kimg[0], block_k), p, 0.0)
    dv_sc[...] += _dot(p.astype(do.dtype), do, _TN)
    dp = _dot(do, v, _NT)             # [block_q, block_k]
    ds = p * (dp - _lanes(delta_ref[0, 0], block_k)) * scale
    dk_sc[...] += _dot(ds.astype(q.dtype), q, _TN)
    dq_ref[0, 0, q_rows, :] += _dot(ds.astype(k.dtype), k, _NN)

  _on_kind(kind_ref[(b * nq + i) * nk + j], step)

  @pl.when(i == nq - 1)
  def _finish_kv():
    dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ grid specs
def grid_spec(s: fb.Shapes, backward: bool) -> pltpu.PrefetchScalarGridSpec:
  """The kernel's grid and BlockSpecs. Operands: 2 scalar-prefetch arrays (BlockMasks.kind, then fwd_k or
  bwd_q), the 3 q-side [B, Tq, LANES] and 3 k-side [B, SUBLANES, Tk] metadata arrays, then q, k, v
  (forward) or q, k, v, dO, lse, delta (backward). Forward grid (b, h, i, j), backward (b, h, j, i); a skipped
  tile's K/V (forward) or query-side (backward) block index is its remapped one, so it fetches nothing."""
  nq, nk, g, d = s.tq // s.block_q, s.tk // s.block_k, s.h // s.kvh, s.d
  bq, bk = s.block_q, s.block_k
  blk = lambda rows, cols: (1, 1, rows, cols)   # noqa: E731
  if not backward:
    def kv_block(b, i, j, kidx):
      return kidx[(b * nq + i) * nk + j]
    in_specs = (
        [pl.BlockSpec((1, bq, LANES), lambda b, h, i, j, kind, kidx: (b, i, 0))] * 3
        + [pl.BlockSpec((1, SUBLANES, bk), lambda b, h, i, j, kind, kidx: (b, 0, kv_block(b, i, j, kidx)))] * 3
        + [pl.BlockSpec(blk(bq, d), lambda b, h, i, j, kind, kidx: (b, h, i, 0))]
        + [pl.BlockSpec(blk(bk, d), lambda b, h, i, j, kind, kidx: (b, h // g, kv_block(b, i, j, kidx), 0))] * 2)
    out_specs = [pl.BlockSpec(blk(bq, d), lambda b, h, i, j, kind, kidx: (b, h, i, 0)),
                 pl.BlockSpec(blk(bq, LANES), lambda b, h, i, j, kind, kidx: (b, h, i, 0))]
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(s.b, s.h, nq, nk), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)])

  def q_block(b, j, i, qidx):
    return qidx[(b * nk + j) * nq + i]
  q_side = lambda b, h, j, i, kind, qidx: (b, h, q_block(b, j, i, qidx), 0)   # noqa: E731
  k_side = lambda b, h, j, i, kind, qidx: (b, h // g, j, 0)   # noqa: E731
  in_specs = (
      [pl.BlockSpec((1, bq, LANES), lambda b, h, j, i, kind, qidx: (b, q_block(b, j, i, qidx), 0))] * 3
      + [pl.BlockSpec((1, SUBLANES, bk), lambda b, h, j, i, kind, qidx: (b, 0, j))] * 3
      + [pl.BlockSpec(blk(bq, d), q_side), pl.BlockSpec(blk(bk, d), k_side), pl.BlockSpec(blk(bk, d), k_side),
         pl.BlockSpec(blk(bq, d), q_side), pl.BlockSpec(blk(bq, LANES), q_side),
         pl.BlockSpec(blk(bq, LANES), q_side)])
  out_specs = [pl.BlockSpec(blk(s.tq, d), lambda b, h, j, i, kind, qidx: (b, h, 0, 0)),
               pl.BlockSpec(blk(bk, d), lambda b, h, j, i, kind, qidx: (b, h, j, 0)),
               pl.BlockSpec(blk(bk, d), lambda b, h, j, i, kind, qidx: (b, h, j, 0))]
  return pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(s.b, s.h, nk, nq), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)])


# ------------------------------------------------------------------------------------------ pallas calls
class _Static(NamedTuple):
  """The kernels' static arguments (hashable: custom_vjp nondiff argument)."""
  shapes: fb.Shapes
  interpret: bool
  fwd_cost: tuple    # (flops, transcendentals, bytes_accessed)
  bwd_cost: tuple


def _forward(q, k, v, meta, masks, st: _Static):
  """q [B, H, Tq, D], k/v [B, KVH, Tk, D] -> out [B, H, Tq, D], lse [B, H, Tq, LANES] fp32."""
  s = st.shapes
  b, h, tq, d = q.shape
  kernel = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(d), block_k=s.block_k, head_dim=d)
  out_shape = [jax.ShapeDtypeStruct((b, h, tq, d), q.dtype), jax.ShapeDtypeStruct((b, h, tq, LANES), jnp.float32)]
  return pl.pallas_call(
      kernel, grid_spec=grid_spec(s, backward=False), out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(*st.fwd_cost), interpret=st.interpret, name="lmfusion_flash_fwd",
  )(masks.kind, masks.fwd_k, *meta, q, k, v)


def _backward(q, k, v, do, lse, delta, meta, masks, st: _Static):
  """Gradients; dk/dv per query head [B, H, Tk, D] fp32 (summed over each KV group by the caller)."""
  s = st.shapes
  b, h, tq, d = q.shape
  tk = k.shape[2]
  kernel = functools.partial(_bwd_kernel, scale=1.0 / math.sqrt(d), block_q=s.block_q, block_k=s.block_k)
  out_shape = [jax.ShapeDtypeStruct((b, h, tq, d), jnp.float32),
               jax.ShapeDtypeStruct((b, h, tk, d), jnp.float32), jax.ShapeDtypeStruct((b, h, tk, d), jnp.float32)]
  return pl.pallas_call(
      kernel, grid_spec=grid_spec(s, backward=True), out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(*st.bwd_cost), interpret=st.interpret, name="lmfusion_flash_bwd",
  )(masks.kind, masks.bwd_q, *meta, q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, meta, masks, st):
  return _forward(q, k, v, meta, masks, st)[0]


def _flash_fwd(q, k, v, meta, masks, st):
  o, lse = _forward(q, k, v, meta, masks, st)
  return o, (q, k, v, meta, masks, o, lse)


def _flash_bwd(st, res, do):
  q, k, v, meta, masks, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)   # [B, H, Tq, 1]
  delta = jnp.broadcast_to(delta, lse.shape)
  dq, dk, dv = _backward(q, k, v, do, lse, delta, meta, masks, st)
  b, h, tk, d = dk.shape
  kvh = k.shape[1]
  dk = dk.reshape(b, kvh, h // kvh, tk, d).sum(axis=2)
  dv = dv.reshape(b, kvh, h // kvh, tk, d).sum(axis=2)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), (meta, masks))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------ entry point
def _pad_len(x, length: int, axis: int, value=0):
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _block(n: int, want: int) -> tuple[int, int]:
  """(block, padded length): lengths are padded to a multiple of LANES, then of the block; short sequences
  use one block. Blocks below LANES (multiples of 8) are for interpret-mode tests."""
  padded = -(-n // LANES) * LANES
  block = min(want, padded)
  return block, -(-padded // block) * block


def _meta_arrays(q_info: TokenInfo, k_info: TokenInfo):
  qs = [jnp.broadcast_to(x[:, :, None], x.shape + (LANES,)) for x in q_info]
  ks = [jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1])) for x in k_info]
  return qs + ks


def _is_concrete(info: TokenInfo) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in info)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _padded_masks(q_info: TokenInfo, k_info: TokenInfo, tq_pad: int, tk_pad: int, bq: int, bk: int):
  # Padding keys get segment 0 (never attended); padding queries attend nothing and are cut off later.
  q_info = TokenInfo(*(_pad_len(jnp.asarray(x, jnp.int32), tq_pad, 1, 0) for x in q_info))
  k_info = TokenInfo(*(_pad_len(jnp.asarray(x, jnp.int32), tk_pad, 1, 0) for x in k_info))
  return q_info, k_info, fb.block_masks(q_info, k_info, bq, bk)


def prepare(q_shape, k_shape, q_info: TokenInfo, k_info: TokenInfo, *, block_q: int, block_k: int,
            itemsize: int, tile_fraction: Optional[float] = None):
  """(shapes, padded q_info, padded k_info, block masks, fwd cost, bwd cost) of one unsharded call with
  q [B, Tq, H, D], k [B, Tk, KVH, D]. With concrete token info the masks are computed here, eagerly (even
  inside a trace), and the costs are exact; else they are traced and the costs use `tile_fraction`."""
  b, tq, h, d = q_shape
  tk, kvh = k_shape[1], k_shape[2]
  bq, tq_pad = _block(tq, block_q)
  bk, tk_pad = _block(tk, block_k)
  shapes = fb.Shapes(b, h, kvh, tq_pad, tk_pad, bq, bk, d, itemsize, LANES, SUBLANES)
  concrete = _is_concrete(q_info) and _is_concrete(k_info)
  with jax.ensure_compile_time_eval() if concrete else contextlib.nullcontext():
    q_info, k_info, masks = _padded_masks(q_info, k_info, tq_pad, tk_pad, bq, bk)
  known = masks if concrete else None
  fwd_cost = fb.cost(shapes, known, tile_fraction, backward=False)
  bwd_cost = fb.cost(shapes, known, tile_fraction, backward=True)
  return shapes, q_info, k_info, masks, fwd_cost, bwd_cost


def _local_flash(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, block_q: int, block_k: int,
                 interpret: bool, tile_fraction: Optional[float]):
  """Unsharded: q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, D]."""
  tq = q.shape[1]
  shapes, q_info, k_info, masks, fwd_cost, bwd_cost = prepare(
      q.shape, k.shape, q_info, k_info, block_q=block_q, block_k=block_k,
      itemsize=jnp.dtype(q.dtype).itemsize, tile_fraction=tile_fraction)
  qt = _pad_len(q, shapes.tq, 1).transpose(0, 2, 1, 3)       # [B, H, Tq, D]
  kt = _pad_len(k, shapes.tk, 1).transpose(0, 2, 1, 3)       # [B, KVH, Tk, D]
  vt = _pad_len(v, shapes.tk, 1).transpose(0, 2, 1, 3)
  st = _Static(shapes, interpret, fwd_cost, bwd_cost)
  out = _flash(qt, kt, vt, _meta_arrays(q_info, k_info), masks, st)
  return out.transpose(0, 2, 1, 3)[:, :tq]


def flash_attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, block_q: int = 512,
                    block_k: int = 512, interpret: bool = False, tile_fraction: Optional[float] = None):
  """Hybrid-mask attention. q [B, Tq, H, D], k/v [B, Tk, KVH, D]; returns [B, Tq, H, D] in q's dtype.

  Under a mesh (jax.set_mesh) it runs per shard: batch over the "batch" rule's axes, heads over "tensor"
  (when the KV heads do not split like the query heads, K/V are repeated to one head per query head).
  `tile_fraction`: the expected fraction of computed (non-empty) tiles, for the cost estimate when the token
  info is traced (module docstring); None = 1.0. It does not change what is computed.
  """
  if tile_fraction is not None and not 0.0 <= tile_fraction <= 1.0:
    raise ValueError(f"flash attention: tile_fraction={tile_fraction} must be in [0, 1]")
  run = functools.partial(_local_flash, block_q=block_q, block_k=block_k, interpret=interpret,
                          tile_fraction=tile_fraction)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return run(q, k, v, q_info, k_info)
  q_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), mesh, shape=q.shape)
  kv_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), mesh, shape=k.shape)
  if q_spec[2] != kv_spec[2]:
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    kv_spec = q_spec
  info_spec = sharding.logical_to_spec(("batch", None), mesh, shape=q_info.positions.shape)
  k_info_spec = sharding.logical_to_spec(("batch", None), mesh, shape=k_info.positions.shape)
  if info_spec[0] != q_spec[0] or k_info_spec[0] != q_spec[0]:
    raise ValueError(f"flash attention: the batch of q {q.shape} and of its token info "
                     f"{q_info.positions.shape} must shard alike ({q_spec} vs {info_spec})")
  return jax.shard_map(
      run, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, TokenInfo(*[info_spec] * 3), TokenInfo(*[k_info_spec] * 3)),
      out_specs=q_spec, check_vma=False)(q, k, v, q_info, k_info)
