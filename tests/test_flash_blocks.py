"""Block sparsity of the flash kernel (models/flash_blocks.py): tile kinds are conservative, skipped tiles
fetch nothing, and the kernels' CostEstimates equal an independent walk of their grids and BlockSpecs."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmfusion_jax.data.packing import RowPacker
from lmfusion_jax.data.sequences import layout_document
from lmfusion_jax.models import flash_attention as FA
from lmfusion_jax.models import flash_blocks as fb
from lmfusion_jax.models.mask import TokenInfo, hybrid_mask, image_info, text_info

SPECIAL = dict(bos=1, eos=2, boi=3, eoi=4)


def layout_rows(rows, text_len: int, image_slots: int, tokens_per_image: int) -> TokenInfo:
  """TokenInfo [len(rows), image_slots * P + text_len] of rows packed by the data pipeline's RowPacker and
  laid out as the model attends them ([image | text], models/decoder.py). rows: per row a list of
  (caption_len, caption_first) documents, one image each."""
  packer = RowPacker(text_len, image_slots, (1, 1, 1))
  out = []
  for docs in rows:
    for n, (caption_len, caption_first) in enumerate(docs):
      doc = layout_document(str(n), list(range(10, 10 + caption_len)), np.zeros((1, 1, 1), np.float32),
                            caption_first=caption_first, special=SPECIAL, tokens_per_image=tokens_per_image)
      packer.add(doc)
    out.append(packer.emit())
  r = {k: np.stack([row[k] for row in out]) for k in out[0]}
  img = image_info(jnp.asarray(r["image_positions"]), jnp.asarray(r["image_segment_ids"]), tokens_per_image)
  txt = text_info(jnp.asarray(r["text_positions"]), jnp.asarray(r["text_segment_ids"]))
  return TokenInfo.concat([img, txt])


# Rows of the tests: caption-first, image-first, mixed (with a dropped caption), and a partly empty row.
MODEL_ROWS = [[(10, True), (21, True)], [(5, False), (30, False), (12, False)],
              [(0, True), (17, False), (8, True)], [(25, False)]]


@functools.lru_cache(maxsize=None)
def model_info() -> TokenInfo:
  return layout_rows(MODEL_ROWS, text_len=80, image_slots=3, tokens_per_image=16)


def random_info(rng, b, t, kind):
  if kind == "shuffled":   # packed documents, tokens in random order
    info = model_info()
    perm = rng.permutation(info.positions.shape[1])
    return TokenInfo(*(x[:, perm] for x in info))
  ints = lambda lo, hi, shape: rng.integers(lo, hi, shape).astype(np.int32)   # noqa: E731
  if kind == "arbitrary":   # any values (negative segments, images across documents; no pipeline makes them)
    return TokenInfo(*(jnp.asarray(ints(lo, hi, (b, t))) for lo, hi in ((0, 6), (-1, 3), (-1, 2))))
  # "chunky": runs of 32 tokens sharing a segment (-1..2) and, half of the time, an image id; positions
  # by chunk plus random offsets, so that many tiles are EMPTY or FULL in unusual ways
  c = 32
  chunk = lambda x: np.repeat(x, c, axis=1)   # noqa: E731
  seg = chunk(ints(-1, 3, (b, t // c)))
  img = np.where(chunk(rng.random((b, t // c)) < 0.5), chunk(ints(-1, 3, (b, t // c))), ints(-1, 3, (b, t)))
  pos = chunk(ints(0, 40, (b, t // c))) + ints(0, 4, (b, t))
  return TokenInfo(jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(img))


@pytest.mark.parametrize("layout", ["model", "shuffled", "arbitrary", "chunky"])
@pytest.mark.parametrize("block_q,block_k", [(8, 8), (16, 32), (32, 16)])
def test_tile_kinds_are_conservative(layout, block_q, block_k):
  """EMPTY only where no element is allowed, FULL only where every element is (the dense mask decides)."""
  rng = np.random.default_rng(block_q * 7 + block_k)
  info = model_info() if layout == "model" else random_info(rng, 4, 256, layout)
  kind = np.asarray(fb.tile_kinds(info, info, block_q, block_k))
  mask = np.asarray(jax.jit(hybrid_mask)(info, info))
  b, t, _ = mask.shape
  tiles = mask.reshape(b, t // block_q, block_q, t // block_k, block_k)
  any_allowed, all_allowed = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))
  assert not np.any(any_allowed & (kind == fb.EMPTY))
  assert np.all(all_allowed[kind == fb.FULL])
  if layout == "chunky":   # the random layout does reach both shortcuts
    assert np.any(kind == fb.EMPTY) and np.any(kind == fb.FULL)
  if layout == "model":   # and the block summaries find most of them on the model's layout
    stats = fb.tile_stats(kind)
    assert stats["empty"] >= 0.85 * np.mean(~any_allowed) > 0.3, stats
    assert stats["full"] >= 0.9 * np.mean(all_allowed), stats


def test_fetch_order_repeats_the_last_fetched_block():
  live = np.array([[[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], [[0, 0, 0, 0]] * 3], bool)
  order = np.asarray(fb.fetch_order(jnp.asarray(live)))
  np.testing.assert_array_equal(order[0], [1, 1, 1, 3, 3, 3, 3, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(order[1], 0)


# ------------------------------------------------------------------------------------------- cost model
def pallas_calls(jaxpr):
  """Every pallas_call equation of a jaxpr, nested ones (custom_vjp, pjit, shard_map) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
      continue
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from pallas_calls(sub)


def walk(spec, kind, prefetch, in_avals, out_avals, backward, d):
  """(flops, transcendentals, bytes) from walking `spec`'s grid in row-major order: a block moves when its
  index map's output differs from the previous step's; flops / exps per tile the kernel computes."""
  nb, _, n_outer, n_inner = spec.grid
  lanes = FA.LANES
  specs = list(spec.in_specs) + list(spec.out_specs)
  avals = list(in_avals) + list(out_avals)
  prev = [None] * len(specs)
  flops = exps = 0
  moved = sum(int(np.size(p)) * 4 for p in prefetch)
  bq = spec.in_specs[6].block_shape[2]
  bk = spec.in_specs[7].block_shape[2]
  for g in itertools.product(*(range(n) for n in spec.grid)):
    for n, (bs, aval) in enumerate(zip(specs, avals)):
      idx = tuple(int(x) for x in bs.index_map(*g, *prefetch))
      if idx != prev[n]:
        moved += math.prod(bs.block_shape) * aval.dtype.itemsize
        prev[n] = idx
    b, _, outer, inner = g
    i, j = (inner, outer) if backward else (outer, inner)
    if kind[(b * (n_inner if backward else n_outer) + i) * (n_outer if backward else n_inner) + j] != fb.EMPTY:
      flops += (10 if backward else 4) * bq * bk * d
      exps += bq * bk + (0 if backward else bq * lanes)
    if not backward and inner == n_inner - 1:
      exps += bq * lanes    # the final log
  return flops, exps, moved


def check_costs(jaxpr, shapes, masks):
  calls = {e.params["name"]: e for e in pallas_calls(jaxpr)}
  assert set(calls) == {"lmfusion_flash_fwd", "lmfusion_flash_bwd"}, set(calls)
  masks = fb.BlockMasks(*(np.asarray(x) for x in masks))
  for name, backward, prefetch in (("lmfusion_flash_fwd", False, (masks.kind, masks.fwd_k)),
                                   ("lmfusion_flash_bwd", True, (masks.kind, masks.bwd_q))):
    eqn = calls[name]
    spec = FA.grid_spec(shapes, backward)
    assert tuple(eqn.params["grid_mapping"].grid) == tuple(spec.grid)
    in_avals = [v.aval for v in eqn.invars[2:]]
    out_avals = [v.aval for v in eqn.outvars]
    want = walk(spec, masks.kind, prefetch, in_avals, out_avals, backward, shapes.d)
    est = eqn.params["cost_estimate"]
    assert (est.flops, est.transcendentals, est.bytes_accessed) == want, (name, est, want)


COST_CASES = {
    # name: (batch, heads, kv_heads, Tq, Tk, head_dim, block_q, block_k, info)
    "model_layout_gqa": (4, 4, 2, 128, 128, 16, 16, 32, "model"),
    "mha_shuffled": (4, 2, 2, 128, 128, 8, 32, 16, "shuffled"),
    "decode_longer_keys": (4, 4, 1, 32, 128, 16, 8, 16, "decode"),
    "dense_one_block": (4, 4, 2, 100, 100, 32, 512, 512, "model"),
}


@pytest.mark.parametrize("case", sorted(COST_CASES))
def test_cost_estimate_equals_a_walk_of_the_grid(case):
  """With concrete token info the CostEstimates the two pallas_calls carry (forward, backward) equal the
  flops, exps and block moves of their grids walked step by step."""
  b, h, kvh, tq, tk, d, bq, bk, layout = COST_CASES[case]
  info = model_info() if layout != "shuffled" else random_info(np.random.default_rng(0), b, 128, "shuffled")
  k_info = TokenInfo(*(x[:, :tk] for x in info))
  q_info = TokenInfo(*(x[:, -tq:] for x in info)) if layout == "decode" else TokenInfo(*(x[:, :tq] for x in info))
  q = jax.ShapeDtypeStruct((b, tq, h, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, tk, kvh, d), jnp.float32)

  def loss(q, k, v):
    return FA.flash_attention(q, k, v, q_info, k_info, block_q=bq, block_k=bk, interpret=True).sum()
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv).jaxpr
  shapes, qi, ki, masks, _, _ = FA.prepare(q.shape, kv.shape, q_info, k_info, block_q=bq, block_k=bk, itemsize=4)
  np.testing.assert_array_equal(masks.kind, fb.tile_kinds(qi, ki, shapes.block_q, shapes.block_k).reshape(-1))
  check_costs(jaxpr, shapes, masks)


def test_cost_estimate_at_the_8b_training_shapes():
  """Llama-3-8B attention per v5p chip (4 rows x 4096, 32 / 8 heads x 128, bf16, blocks 512) on rows laid out
  like the training data (4 images of 256 tokens, 3072 text slots): the estimate equals the walk."""
  rows = [[(60, True), (120, True), (35, False), (80, True)], [(200, True), (10, False), (90, True), (0, True)],
          [(45, True), (70, True), (150, False), (30, True)], [(100, True), (64, True), (20, True)]]
  info = layout_rows(rows, 3072, 4, 256)
  q = jax.ShapeDtypeStruct((4, 4096, 32, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 4096, 8, 128), jnp.bfloat16)

  def loss(q, k, v):
    return FA.flash_attention(q, k, v, info, info).astype(jnp.float32).sum()
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv).jaxpr
  shapes, _, _, masks, _, _ = FA.prepare(q.shape, kv.shape, info, info, block_q=512, block_k=512, itemsize=2)
  assert fb.tile_stats(masks.kind)["empty"] > 0.5
  check_costs(jaxpr, shapes, masks)


def test_traced_token_info_uses_the_expected_tile_fraction():
  """Token info traced (a jitted step): the dense grid's walk (every tile computed), with flops and the
  tile-proportional terms scaled by tile_fraction."""
  b, h, kvh, t, d, bq, bk = 2, 4, 2, 128, 16, 16, 32
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.float32)
  info = TokenInfo(*(jax.ShapeDtypeStruct((b, t), jnp.int32) for _ in range(3)))
  shapes = fb.Shapes(b, h, kvh, t, t, bq, bk, d, 4, FA.LANES, FA.SUBLANES)
  dense = fb.dense_masks(b, t // bq, t // bk)
  ests = {}
  for frac in (None, 0.25):
    def loss(q, k, v, info):
      return FA.flash_attention(q, k, v, info, info, block_q=bq, block_k=bk, interpret=True,
                                tile_fraction=frac).sum()
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv, info).jaxpr
    if frac is None:
      check_costs(jaxpr, shapes, dense)
    ests[frac] = {e.params["name"]: e.params["cost_estimate"] for e in pallas_calls(jaxpr)}
  for name in ests[None]:
    assert ests[0.25][name].flops == ests[None][name].flops // 4
    assert ests[0.25][name].bytes_accessed < ests[None][name].bytes_accessed


def test_dense_masks_equal_the_masks_of_all_partial_tiles():
  want = fb.block_masks_from_kinds(np.full((2, 3, 5), fb.PARTIAL, np.int32))
  for a, b in zip(fb.dense_masks(2, 3, 5), want):
    np.testing.assert_array_equal(a, b)
