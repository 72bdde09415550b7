"""Block sparsity for the flash kernel: per-tile block masks from the per-token arrays, the order in which
the kernel fetches blocks, and its cost estimate.

Each (query block i, key block j) tile of a row is one of
  EMPTY    no element allowed: the kernel skips it (no compute, and no DMA: see `fetch_order`)
  PARTIAL  some elements may be allowed: the mask is rebuilt per element (models/mask.py)
  FULL     every element allowed: computed without the per-element mask
decided from per-block summaries (min / max of segment ids, positions and image ids), O(tokens + tiles),
outside the kernel (in the jitted step when the token info is traced: a few element-wise ops and
reductions per call); the kernel reads the result as scalar-prefetch operands in SMEM: 2 x B x nq x nk
int32 per kernel, 2 KiB at 4 rows x (4096 / 512)^2 tiles, growing with (seq / block)^2.

Conservative, by construction: a tile is marked EMPTY / FULL only when that holds for every element.
With allowed(q, k) = seg_q == seg_k != 0 and (pos_k <= pos_q or img_q == img_k >= 0) (models/mask.py),
"live" tokens being those with seg != 0 and ranges [lo, hi] taken over a block's live tokens (image ids:
over its live tokens with img >= 0), a tile is EMPTY if
  (e1) the q block or the k block has no live token: allowed needs seg_q == seg_k != 0, so both are live;
  (e2) the live segment ranges are disjoint: an allowed element has seg_q == seg_k = s, s in both ranges;
  (e3) k.pos_lo > q.pos_hi and the image-id ranges are disjoint (or one side has no image token): for an
       allowed element (both live) pos_k >= k.pos_lo > q.pos_hi >= pos_q, so it needs img_q == img_k = t
       >= 0, with t in both image ranges.
A tile is FULL if (f1) every token of both blocks (padding included) has one and the same segment s != 0,
and (f2) k.pos_hi <= q.pos_lo, or every token of both blocks has one and the same image id t >= 0: by (f1)
every element has seg_q == seg_k != 0, and by (f2) pos_k <= k.pos_hi <= q.pos_lo <= pos_q (by (f1) all
tokens are live, so the live ranges are the whole blocks') or img_q == img_k == t >= 0.
A FULL tile has allowed elements, so it never meets an EMPTY test; EMPTY is checked first anyway.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmfusion_jax.models.mask import TokenInfo

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = np.iinfo(np.int32).max
_SMALL = np.iinfo(np.int32).min


class BlockMasks(NamedTuple):
  """Scalar-prefetch operands, flattened row-major (1-D, so SMEM holds them unpadded).

  kind   int32 [B * nq * nk]  EMPTY / PARTIAL / FULL of tile (b, i, j) at (b * nq + i) * nk + j
  fwd_k  int32 [B * nq * nk]  key block the forward fetches at its grid step (b, ., i, j)
  bwd_q  int32 [B * nk * nq]  query block the backward fetches at its grid step (b, ., j, i), at
                              (b * nk + j) * nq + i
  """
  kind: object
  fwd_k: object
  bwd_q: object


def _summary(info: TokenInfo, block: int) -> dict:
  """Per-block [B, n] summaries (see the module docstring for which tokens each range covers)."""
  b, t = info.positions.shape
  pos, seg, img = (x.reshape(b, t // block, block) for x in info)
  live = seg != 0
  live_img = live & (img >= 0)

  def lo(x, m):
    return jnp.min(jnp.where(m, x, _BIG), axis=-1)

  def hi(x, m):
    return jnp.max(jnp.where(m, x, _SMALL), axis=-1)
  return dict(
      any=jnp.any(live, axis=-1), seg_lo=lo(seg, live), seg_hi=hi(seg, live),
      pos_lo=lo(pos, live), pos_hi=hi(pos, live),
      any_img=jnp.any(live_img, axis=-1), img_lo=lo(img, live_img), img_hi=hi(img, live_img),
      # over every token, padding included (for FULL)
      seg_min=jnp.min(seg, axis=-1), seg_max=jnp.max(seg, axis=-1),
      img_min=jnp.min(img, axis=-1), img_max=jnp.max(img, axis=-1))


@functools.partial(jax.jit, static_argnums=(2, 3))
def tile_kinds(q_info: TokenInfo, k_info: TokenInfo, block_q: int, block_k: int):
  """int32 [B, nq, nk]: EMPTY / PARTIAL / FULL per tile (lengths must be multiples of the blocks)."""
  q = {n: x[:, :, None] for n, x in _summary(q_info, block_q).items()}
  k = {n: x[:, None, :] for n, x in _summary(k_info, block_k).items()}
  img_overlap = q["any_img"] & k["any_img"] & (q["img_lo"] <= k["img_hi"]) & (k["img_lo"] <= q["img_hi"])
  empty = (~(q["any"] & k["any"])                                           # (e1)
           | (q["seg_hi"] < k["seg_lo"]) | (k["seg_hi"] < q["seg_lo"])      # (e2)
           | ((k["pos_lo"] > q["pos_hi"]) & ~img_overlap))                  # (e3)
  one_doc = ((q["seg_min"] == q["seg_max"]) & (k["seg_min"] == k["seg_max"])
             & (q["seg_min"] == k["seg_min"]) & (q["seg_min"] != 0))        # (f1)
  one_image = ((q["img_min"] == q["img_max"]) & (k["img_min"] == k["img_max"])
               & (q["img_min"] == k["img_min"]) & (q["img_min"] >= 0))
  full = one_doc & ((k["pos_hi"] <= q["pos_lo"]) | one_image)               # (f2)
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def fetch_order(live):
  """live bool [B, n_outer, n_inner] (grid order: inner fastest) -> int32 [B, n_outer * n_inner]: the inner
  block to fetch at each step. A live step fetches its own block; a skipped step repeats the block of the
  last live step before it in the row's order (the first live one after it if none; 0 if the row has none),
  so the pipeline, which fetches only when a block index changes, does no DMA for skipped tiles (splash
  attention's data_next)."""
  b, n_outer, n_inner = live.shape
  live = live.reshape(b, -1)
  t = jnp.arange(n_outer * n_inner, dtype=jnp.int32)
  prev = lax.cummax(jnp.where(live, t, -1), axis=1)
  nxt = lax.cummin(jnp.where(live, t, _BIG), axis=1, reverse=True)
  src = jnp.where(prev >= 0, prev, jnp.where(nxt < _BIG, nxt, 0))
  return (src % n_inner).astype(jnp.int32)


def block_masks(q_info: TokenInfo, k_info: TokenInfo, block_q: int, block_k: int) -> BlockMasks:
  return block_masks_from_kinds(tile_kinds(q_info, k_info, block_q, block_k))


def dense_masks(b: int, nq: int, nk: int) -> BlockMasks:
  """Every tile PARTIAL (no skipping), in numpy (usable inside any trace or mesh context): the worst case,
  for cost estimates of traced token info. Equals block_masks_from_kinds of all-PARTIAL kinds."""
  return BlockMasks(np.full((b * nq * nk,), PARTIAL, np.int32),
                    np.tile(np.arange(nk, dtype=np.int32), b * nq), np.tile(np.arange(nq, dtype=np.int32), b * nk))


@jax.jit
def block_masks_from_kinds(kind) -> BlockMasks:
  """BlockMasks from tile kinds int [B, nq, nk]."""
  kind = jnp.asarray(kind, jnp.int32)
  live = kind != EMPTY
  return BlockMasks(kind.reshape(-1), fetch_order(live).reshape(-1),
                    fetch_order(live.transpose(0, 2, 1)).reshape(-1))


# --------------------------------------------------------------------------------------------- cost model
def _fetches(grid, *index):
  """Block fetches (or write-backs) of one operand over the grid: 1 + the number of grid steps, in
  row-major order, at which its block index differs from the previous step's. `index`: the block index's
  components, each broadcastable to the grid shape."""
  idx = np.stack([np.broadcast_to(a, grid).reshape(-1) for a in index], axis=1)
  return 1 + int(np.count_nonzero(np.any(idx[1:] != idx[:-1], axis=1)))


class Shapes(NamedTuple):
  """Static shapes of one kernel call: b, heads, kv heads, padded lengths, blocks, head dim, dtype sizes."""
  b: int
  h: int
  kvh: int
  tq: int
  tk: int
  block_q: int
  block_k: int
  d: int
  itemsize: int      # of q / k / v / o / dO
  lanes: int
  sublanes: int


def _cost_terms(s: Shapes, masks: BlockMasks, backward: bool):
  """(flops, transcendentals, bytes that do not scale with the computed tiles, bytes that do) of the
  kernel's grid walk, with concrete masks. Fetches follow the grid's block index maps (flash_attention.py):
  an input block is read, and an output block written back, once per run of equal block indices."""
  nq, nk = s.tq // s.block_q, s.tk // s.block_k
  g = s.h // s.kvh
  kind = np.asarray(masks.kind).reshape(s.b, nq, nk)
  tiles = int(np.count_nonzero(kind != EMPTY)) * s.h      # computed tiles, all heads
  per_tile = s.block_q * s.block_k
  # SMEM operands, copied in once: kind and the remapped block indices of this kernel
  prefetch = 4 * (int(np.size(masks.kind)) + int(np.size(masks.bwd_q if backward else masks.fwd_k)))
  q_blk = s.block_q * s.d * s.itemsize
  k_blk = s.block_k * s.d * s.itemsize
  stat_blk = s.block_q * s.lanes * 4                      # lse / delta: fp32, lane-replicated
  qmeta_blk = s.block_q * s.lanes * 4                     # 3 per-query metadata arrays [B, Tq, LANES]
  kmeta_blk = s.sublanes * s.block_k * 4                  # 3 per-key metadata arrays [B, SUBLANES, Tk]
  b, h = np.arange(s.b)[:, None, None, None], np.arange(s.h)[None, :, None, None]
  if not backward:   # grid (b, h, i, j)
    grid = (s.b, s.h, nq, nk)
    i = np.arange(nq)[None, None, :, None]
    kv = np.asarray(masks.fwd_k).reshape(s.b, 1, nq, nk)
    fixed = (_fetches(grid, b, h, i) * (2 * q_blk + stat_blk)          # q in; o, lse out
             + 3 * _fetches(grid, b, i) * qmeta_blk + prefetch)
    scaled = 2 * _fetches(grid, b, h // g, kv) * k_blk + 3 * _fetches(grid, b, kv) * kmeta_blk
    # per computed tile: exp of the scores and the [block_q, LANES] rescale exp; per query block: the log
    exps = tiles * (per_tile + s.block_q * s.lanes) + s.b * s.h * nq * s.block_q * s.lanes
    return 4 * tiles * per_tile * s.d, exps, fixed, scaled
  grid = (s.b, s.h, nk, nq)   # grid (b, h, j, i)
  j = np.arange(nk)[None, None, :, None]
  qi = np.asarray(masks.bwd_q).reshape(s.b, 1, nk, nq)
  fixed = (2 * _fetches(grid, b, h // g, j) * k_blk + 3 * _fetches(grid, b, j) * kmeta_blk   # k, v, k meta
           + _fetches(grid, b, h) * s.tq * s.d * 4                                          # dq (fp32) out
           + 2 * _fetches(grid, b, h, j) * s.block_k * s.d * 4 + prefetch)                  # dk, dv out
  scaled = (_fetches(grid, b, h, qi) * (2 * q_blk + 2 * stat_blk)                           # q, dO, lse, delta
            + 3 * _fetches(grid, b, qi) * qmeta_blk)
  return 10 * tiles * per_tile * s.d, tiles * per_tile, fixed, scaled


def cost(s: Shapes, masks=None, tile_fraction=None, backward: bool = False) -> tuple:
  """(flops, transcendentals, bytes_accessed) of the forward or backward kernel.

  masks concrete (BlockMasks of numpy / concrete arrays): exact for what the grid does, i.e. the computed
  (non-EMPTY) tiles' matmuls and exps, plus the forward's per-step rescale exp and its final log (both on
  [block_q, LANES] lane-replicated statistics), and the bytes of every block fetch and write-back.
  masks None: the dense walk (every tile computed) with the tile-proportional terms (flops, per-tile exps,
  and the bytes of the blocks re-fetched per tile: K/V in the forward, Q/dO/lse/delta in the backward)
  scaled by `tile_fraction` (None: 1.0, an upper bound).
  """
  nq, nk = s.tq // s.block_q, s.tk // s.block_k
  frac = 1.0 if masks is not None or tile_fraction is None else float(tile_fraction)
  if masks is None:
    masks = dense_masks(s.b, nq, nk)
  flops, exps, fixed, scaled = _cost_terms(s, masks, backward)
  if frac != 1.0:
    row_terms = 0 if backward else s.b * s.h * nq * s.block_q * s.lanes   # the final log: once per row
    exps = row_terms + (exps - row_terms) * frac
    flops, scaled = flops * frac, scaled * frac
  return int(round(flops)), int(round(exps)), int(round(fixed + scaled))


def tile_stats(kind) -> dict:
  """Fractions of EMPTY / PARTIAL / FULL tiles in an int array of tile kinds."""
  kind = np.asarray(kind)
  n = max(1, kind.size)
  return {name: float(np.count_nonzero(kind == v)) / n for name, v in
          (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}



def causal_tile_fraction(seq_len: int, block_q: int = 512, block_k: int = 512) -> float:
  """The fraction of (q block, k block) tiles a causal mask leaves non-empty for one document filling a row of
  `seq_len` tokens (tiles wholly above the diagonal are skipped): the expected `tile_fraction` of a causal text
  layout, and an upper bound for LMFusion rows (their image blocks of other documents and their padding are
  skipped too)."""
  nq, nk = -(-seq_len // block_q), -(-seq_len // block_k)
  live = sum(1 for i in range(nq) for j in range(nk) if j * block_k <= (i + 1) * block_q - 1)
  return live / (nq * nk)
