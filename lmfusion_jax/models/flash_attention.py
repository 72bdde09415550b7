"""A Pallas TPU flash-attention kernel for the hybrid LMFusion mask, with a cost estimate.

Same contract as `attention.reference_attention` (grouped-query attention, fp32 softmax, a query with no
allowed key gets zeros) but the [q_len, k_len] mask and scores never reach HBM: the mask is rebuilt inside
each (block_q x block_k) tile from the per-token arrays (mask.TokenInfo):

  allowed(q, k) = seg_q == seg_k != 0  and  (pos_k <= pos_q  or  img_q == img_k >= 0)

Forward: online softmax over key blocks, saving the log-sum-exp. Backward: one kernel per (batch, head)
walks key blocks (outer) x query blocks (inner), accumulates dK/dV for the key block and dQ for the whole
sequence in a VMEM-resident output block (so the scores are recomputed once, not twice). That block is
q_len x head_dim fp32, double-buffered: 4 MiB at 4096 x 128; sequences beyond ~16k tokens would exceed the
default scoped VMEM and need a separate dQ pass (the TPU compiler then refuses with a VMEM out-of-memory
error naming lmfusion_flash_bwd, at `plan` time, before any TPU is rented).

Every block is computed (no data-dependent block skipping), so the cost estimate is exact for what runs:
  forward   4 * B * H * Tq * Tk * D flops (QK^T, PV),            B * H * Tq * Tk exp
  backward 10 * B * H * Tq * Tk * D flops (QK^T, dV, dP, dK, dQ), B * H * Tq * Tk exp
  bytes     every HBM block read/write the grid performs (K/V re-read once per query block, Q/dO once per
            key block).
The TPU compiler counts a Pallas kernel as zero flops and zero time unless it carries this estimate.

Under a mesh the kernel runs per shard (shard_map): batch over ("data", "fsdp"), heads over "tensor".
`interpret=True` runs the same kernels on CPU (tests).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lmfusion_jax import sharding
from lmfusion_jax.models.mask import TokenInfo

LANES = 128          # TPU vector lanes: per-query statistics are kept lane-replicated [block_q, LANES]
SUBLANES = 8         # per-key metadata is stored [SUBLANES, k_len] (one row used)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _dot(a, b, dims):
  """fp32-accumulated matmul with the precision pinned per input dtype (bf16 inputs: one MXU pass; fp32
  inputs: full fp32), independent of jax_default_matmul_precision, which Mosaic would reject for bf16."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=(precision, precision), preferred_element_type=jnp.float32)


_NN = (((1,), (0,)), ((), ()))   # a @ b


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


def _scores(q, k, scale, meta, block_k):
  s = _dot(q, k, _NT) * scale   # [block_q, block_k]
  mask = _tile_mask(*meta, block_k)
  return s, mask


# ----------------------------------------------------------------------------------------------- forward
def _fwd_kernel(qpos, qseg, qimg, kpos, kseg, kimg, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, scale: float, block_k: int, head_dim: int):
  kj = pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  meta = (qpos[0], qseg[0], qimg[0], kpos[0], kseg[0], kimg[0])
  s, mask = _scores(q_ref[0, 0], k_ref[0, 0], scale, meta, block_k)
  s = jnp.where(mask, s, MASK_VALUE)
  m_prev = m_sc[...]                                              # [block_q, LANES]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, LANES]
  p = jnp.where(mask, jnp.exp(s - _lanes(m_new, block_k)), 0.0)   # [block_q, block_k]
  alpha = jnp.exp(m_prev - m_new)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  m_sc[...] = m_new
  pv = _dot(p.astype(v_ref.dtype), v_ref[0, 0], _NN)
  acc_sc[...] = _lanes(alpha, head_dim) * acc_sc[...] + pv

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    safe = jnp.where(l > 0.0, l, 1.0)
    o_ref[0, 0] = jnp.where(_lanes(l, head_dim) > 0.0, acc_sc[...] / _lanes(safe, head_dim),
                            0.0).astype(o_ref.dtype)
    lse_ref[0, 0] = m_sc[...] + jnp.log(safe)


# ---------------------------------------------------------------------------------------------- backward
def _bwd_kernel(qpos, qseg, qimg, kpos, kseg, kimg, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dq_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale: float, block_q: int, block_k: int):
  kj, qi = pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init_kv():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  q_rows = pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)

  @pl.when(kj == 0)
  def _init_q():
    dq_ref[0, 0, q_rows, :] = jnp.zeros((block_q, dq_ref.shape[-1]), jnp.float32)

  q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
  meta = (qpos[0], qseg[0], qimg[0], kpos[0], kseg[0], kimg[0])
  s, mask = _scores(q, k, scale, meta, block_k)
  p = jnp.where(mask, jnp.exp(s - _lanes(lse_ref[0, 0], block_k)), 0.0)            # [block_q, block_k]
  dv_sc[...] += _dot(p.astype(do.dtype), do, _TN)
  dp = _dot(do, v, _NT)             # [block_q, block_k]
  ds = p * (dp - _lanes(delta_ref[0, 0], block_k)) * scale
  dk_sc[...] += _dot(ds.astype(q.dtype), q, _TN)
  dq_ref[0, 0, q_rows, :] += _dot(ds.astype(k.dtype), k, _NN)

  @pl.when(qi == pl.num_programs(3) - 1)
  def _finish_kv():
    dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ pallas calls
def _nbytes(*xs) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in xs))


def _meta_specs(block_q: int, block_k: int, q_axis: int, k_axis: int):
  """BlockSpecs of the 3 q-side [B, Tq, LANES] and 3 k-side [B, SUBLANES, Tk] metadata arrays; q_axis /
  k_axis: which grid axis indexes query / key blocks."""
  def q_map(*g):
    return (g[0], g[q_axis], 0)

  def k_map(*g):
    return (g[0], 0, g[k_axis])
  return ([pl.BlockSpec((1, block_q, LANES), q_map)] * 3 + [pl.BlockSpec((1, SUBLANES, block_k), k_map)] * 3)


def _meta_arrays(q_info: TokenInfo, k_info: TokenInfo):
  qs = [jnp.broadcast_to(x[:, :, None], x.shape + (LANES,)) for x in q_info]
  ks = [jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1])) for x in k_info]
  return qs + ks


def _forward(q, k, v, meta, *, block_q, block_k, interpret):
  """q [B, H, Tq, D], k/v [B, KVH, Tk, D] -> out [B, H, Tq, D], lse [B, H, Tq, LANES] fp32."""
  b, h, tq, d = q.shape
  kvh, tk = k.shape[1], k.shape[2]
  g = h // kvh
  nq, nk = tq // block_q, tk // block_k
  kernel = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(d), block_k=block_k, head_dim=d)
  out_shape = [jax.ShapeDtypeStruct((b, h, tq, d), q.dtype), jax.ShapeDtypeStruct((b, h, tq, LANES), jnp.float32)]
  cost = pl.CostEstimate(
      flops=4 * b * h * tq * tk * d, transcendentals=b * h * tq * tk,
      bytes_accessed=_nbytes(q, *out_shape, *meta[:3]) + nq * h // kvh * _nbytes(k, v, *meta[3:]))
  return pl.pallas_call(
      kernel,
      grid=(b, h, nq, nk),
      in_specs=_meta_specs(block_q, block_k, 2, 3) + [
          pl.BlockSpec((1, 1, block_q, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
          pl.BlockSpec((1, 1, block_k, d), lambda bi, hi, i, j: (bi, hi // g, j, 0)),
          pl.BlockSpec((1, 1, block_k, d), lambda bi, hi, i, j: (bi, hi // g, j, 0))],
      out_specs=[pl.BlockSpec((1, 1, block_q, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
                 pl.BlockSpec((1, 1, block_q, LANES), lambda bi, hi, i, j: (bi, hi, i, 0))],
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="lmfusion_flash_fwd",
  )(*meta, q, k, v)


def _backward(q, k, v, do, lse, delta, meta, *, block_q, block_k, interpret):
  """Gradients; dk/dv per query head [B, H, Tk, D] fp32 (summed over each KV group by the caller)."""
  b, h, tq, d = q.shape
  kvh, tk = k.shape[1], k.shape[2]
  g = h // kvh
  nq, nk = tq // block_q, tk // block_k
  kernel = functools.partial(_bwd_kernel, scale=1.0 / math.sqrt(d), block_q=block_q, block_k=block_k)
  out_shape = [jax.ShapeDtypeStruct((b, h, tq, d), jnp.float32),
               jax.ShapeDtypeStruct((b, h, tk, d), jnp.float32), jax.ShapeDtypeStruct((b, h, tk, d), jnp.float32)]
  cost = pl.CostEstimate(
      flops=10 * b * h * tq * tk * d, transcendentals=b * h * tq * tk,
      bytes_accessed=(_nbytes(*out_shape, *meta[3:]) + nk * _nbytes(q, do, lse, delta, *meta[:3])
                      + g * _nbytes(k, v)))
  q_spec = lambda bi, hi, j, i: (bi, hi, i, 0)   # noqa: E731
  k_spec = lambda bi, hi, j, i: (bi, hi // g, j, 0)   # noqa: E731
  return pl.pallas_call(
      kernel,
      grid=(b, h, nk, nq),
      in_specs=_meta_specs(block_q, block_k, 3, 2) + [
          pl.BlockSpec((1, 1, block_q, d), q_spec), pl.BlockSpec((1, 1, block_k, d), k_spec),
          pl.BlockSpec((1, 1, block_k, d), k_spec), pl.BlockSpec((1, 1, block_q, d), q_spec),
          pl.BlockSpec((1, 1, block_q, LANES), q_spec), pl.BlockSpec((1, 1, block_q, LANES), q_spec)],
      out_specs=[pl.BlockSpec((1, 1, tq, d), lambda bi, hi, j, i: (bi, hi, 0, 0)),
                 pl.BlockSpec((1, 1, block_k, d), lambda bi, hi, j, i: (bi, hi, j, 0)),
                 pl.BlockSpec((1, 1, block_k, d), lambda bi, hi, j, i: (bi, hi, j, 0))],
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="lmfusion_flash_bwd",
  )(*meta, q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, meta, block_q, block_k, interpret):
  return _forward(q, k, v, meta, block_q=block_q, block_k=block_k, interpret=interpret)[0]


def _flash_fwd(q, k, v, meta, block_q, block_k, interpret):
  o, lse = _forward(q, k, v, meta, block_q=block_q, block_k=block_k, interpret=interpret)
  return o, (q, k, v, meta, o, lse)


def _flash_bwd(block_q, block_k, interpret, res, do):
  q, k, v, meta, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)   # [B, H, Tq, 1]
  delta = jnp.broadcast_to(delta, lse.shape)
  dq, dk, dv = _backward(q, k, v, do, lse, delta, meta, block_q=block_q, block_k=block_k, interpret=interpret)
  b, h, tk, d = dk.shape
  kvh = k.shape[1]
  dk = dk.reshape(b, kvh, h // kvh, tk, d).sum(axis=2)
  dv = dv.reshape(b, kvh, h // kvh, tk, d).sum(axis=2)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), meta)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros


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
  """(block, padded length): blocks are multiples of LANES; short sequences use one block."""
  padded = -(-n // LANES) * LANES
  block = min(want, padded)
  return block, -(-padded // block) * block


def _local_flash(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, block_q: int, block_k: int,
                 interpret: bool):
  """Unsharded: q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, D]."""
  tq, tk = q.shape[1], k.shape[1]
  bq, tq_pad = _block(tq, block_q)
  bk, tk_pad = _block(tk, block_k)
  # Padding keys get segment 0 (never attended); padding queries attend nothing and are cut off below.
  q_info = TokenInfo(*(_pad_len(x, tq_pad, 1, 0) for x in q_info))
  k_info = TokenInfo(*(_pad_len(x, tk_pad, 1, 0) for x in k_info))
  qt = _pad_len(q, tq_pad, 1).transpose(0, 2, 1, 3)       # [B, H, Tq, D]
  kt = _pad_len(k, tk_pad, 1).transpose(0, 2, 1, 3)       # [B, KVH, Tk, D]
  vt = _pad_len(v, tk_pad, 1).transpose(0, 2, 1, 3)
  meta = _meta_arrays(q_info, k_info)
  out = _flash(qt, kt, vt, meta, bq, bk, interpret)
  return out.transpose(0, 2, 1, 3)[:, :tq]


def flash_attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, block_q: int = 512,
                    block_k: int = 512, interpret: bool = False):
  """Hybrid-mask attention. q [B, Tq, H, D], k/v [B, Tk, KVH, D]; returns [B, Tq, H, D] in q's dtype.

  Under a mesh (jax.set_mesh) it runs per shard: batch over the "batch" rule's axes, heads over "tensor"
  (when the KV heads do not split like the query heads, K/V are repeated to one head per query head).
  """
  run = functools.partial(_local_flash, block_q=block_q, block_k=block_k, interpret=interpret)
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
