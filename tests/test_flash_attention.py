"""The Pallas flash-attention kernel (models/flash_attention.py) against the XLA reference.

On CPU the kernel runs interpreted (the same kernel body, grid and block specs); the TPU compile of the very
same kernel (Mosaic) is checked with libtpu's compile-only devices, including that its cost estimate is
what the compiler counts. Block sparsity (EMPTY / PARTIAL / FULL tiles) is exercised with small blocks on
rows laid out as the model attends them (tests/test_flash_blocks.py: its masks and cost estimate).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lmfusion_jax import sharding
from lmfusion_jax.models import attention as A
from lmfusion_jax.models import flash_blocks as fb
from lmfusion_jax.models.flash_attention import flash_attention, prepare
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.models.mask import TokenInfo
from test_flash_blocks import model_info


def packed_info(rng, batch: int, length: int, shuffle: bool = True):
  """Two documents per row (each with an image of 16 tokens), a padding tail, tokens in random order."""
  pos = np.zeros((batch, length), np.int32)
  seg = np.zeros((batch, length), np.int32)
  img = -np.ones((batch, length), np.int32)
  doc = (length - 20) // 2
  for b in range(batch):
    for d in range(2):
      s = d * doc
      pos[b, s:s + doc] = np.arange(doc)
      seg[b, s:s + doc] = d + 1
      img[b, s + 5 + 3 * b:s + 21 + 3 * b] = d
  if shuffle:
    perm = rng.permutation(length)
    pos, seg, img = pos[:, perm], seg[:, perm], img[:, perm]
  return TokenInfo(jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(img))


def qkv(rng, batch, tq, tk, heads, kv_heads, dim, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(batch, tq, heads, dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, tk, kv_heads, dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, tk, kv_heads, dim)), dtype)
  return q, k, v


def flash(q, k, v, qi, ki, **kw):
  return flash_attention(q, k, v, qi, ki, interpret=True, **{"block_q": 128, "block_k": 128, **kw})


def value_and_grads(fn, q, k, v, w):
  return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2))(
      q, k, v)


def jit_value_and_grads(fn):
  """Jitted (loss, grads, output) of fn(q, k, v) in one compile (token info closed over: concrete, so the
  kernel's block masks and cost estimate are computed at trace time)."""
  def run(q, k, v, w):
    def loss(q, k, v):
      out = fn(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * w), out
    (l, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return l, grads, out
  return jax.jit(run)


def max_diffs(got, want):
  return float(abs(got[0] - want[0])), [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got[1], want[1])]


@pytest.mark.parametrize("heads,kv_heads,length", [(4, 2, 300), (2, 2, 256), (4, 1, 130)])
def test_forward_and_gradients_equal_reference(heads, kv_heads, length):
  """Packed documents, images, padding, GQA/MHA, lengths that need padding to the block, several blocks."""
  rng = np.random.default_rng(length)
  info = packed_info(rng, 2, length)
  q, k, v = qkv(rng, 2, length, length, heads, kv_heads, 16)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  l_ref, g_ref, out_ref = jit_value_and_grads(lambda q, k, v: A.xla_attention(q, k, v, info, info))(q, k, v, w)
  l_fl, g_fl, out_fl = jit_value_and_grads(lambda q, k, v: flash(q, k, v, info, info))(q, k, v, w)
  np.testing.assert_allclose(out_fl, out_ref, atol=1e-5, rtol=0)
  padding = np.asarray(info.segment_ids) == 0
  assert padding.any() and np.all(np.asarray(out_fl)[padding] == 0.0)   # no key allowed -> zeros, not NaN
  np.testing.assert_allclose(l_fl, l_ref, rtol=1e-5)
  for name, a, b in zip("qkv", g_fl, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=f"d{name}")


def test_queries_against_a_longer_key_sequence():
  """Decoding-style: the queries are the last tokens of the keys' sequence (KV cache); blocks 8 x 32, the
  first document's key blocks are skipped."""
  rng = np.random.default_rng(1)
  info = packed_info(rng, 2, 260, shuffle=False)
  q_info = TokenInfo(*(x[:, -40:] for x in info))
  q, k, v = qkv(rng, 2, 40, 260, 4, 2, 16)
  np.testing.assert_allclose(flash(q, k, v, q_info, info, block_q=8, block_k=32),
                             A.xla_attention(q, k, v, q_info, info), atol=1e-5, rtol=0)


def test_bf16_inputs_close_to_reference():
  rng = np.random.default_rng(2)
  info = packed_info(rng, 1, 256)
  q, k, v = qkv(rng, 1, 256, 256, 2, 1, 32, jnp.bfloat16)
  out = flash(q, k, v, info, info)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(A.xla_attention(q, k, v, info, info),
                                                                     np.float32), atol=2e-2, rtol=0)


def check_close(got, want, what):
  l_diff, g_diffs = max_diffs(got, want)
  print(f"{what}: |loss diff| {l_diff:.2e}, max |d(q, k, v) diff| {', '.join(f'{x:.2e}' for x in g_diffs)}")
  # the loss sums ~30k weighted outputs of size ~1 in different orders: fp32 rounding ~1e-5 absolute
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  for name, a, b in zip("qkv", got[1], want[1]):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=f"d{name}")


def test_block_sparse_equals_reference():
  """Rows as the model attends them ([image | text], packed by the data pipeline): caption-first,
  image-first and mixed documents (one with a dropped caption), a partly empty row; GQA (4 query heads per
  KV head); blocks 8 x 16, so every tile kind occurs: skipped EMPTY, unmasked FULL, masked PARTIAL ones."""
  rng = np.random.default_rng(5)
  info = model_info()                                     # 4 rows x 128 tokens
  stats = fb.tile_stats(prepare((4, 128, 4, 8), (4, 128, 1, 8), info, info, block_q=8, block_k=16,
                                itemsize=4)[3].kind)
  assert min(stats.values()) > 0.05, stats
  q, k, v = qkv(rng, 4, 128, 128, 4, 1, 8)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = jit_value_and_grads(lambda q, k, v: A.xla_attention(q, k, v, info, info))(q, k, v, w)
  got = jit_value_and_grads(lambda q, k, v: flash(q, k, v, info, info, block_q=8, block_k=16))(q, k, v, w)
  check_close(got, want, "block-sparse 8x16")
  np.testing.assert_allclose(got[2], want[2], atol=1e-5, rtol=0)
  assert np.all(np.asarray(got[2])[np.asarray(info.segment_ids) == 0] == 0.0)


def test_sharded_over_8_devices_equals_unsharded(num_devices):
  """Under an fsdp=4 x tensor=2 mesh the kernel runs per shard (shard_map; the block masks are then computed
  from traced token info, per shard): the block-sparse kernel (blocks 16 x 8) on the model's row layout
  gives the reference's values and gradients."""
  assert num_devices == 8
  rng = np.random.default_rng(3)
  mesh = sharding.make_mesh(1, 4, 2)
  info = model_info()
  q, k, v = qkv(rng, 4, 128, 128, 4, 2, 16)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = jit_value_and_grads(lambda q, k, v: A.xla_attention(q, k, v, info, info))(q, k, v, w)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x: jax.device_put(x, batch)   # noqa: E731
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, w, info: value_and_grads(
        lambda q, k, v: flash(q, k, v, info, info, block_q=16, block_k=8), q, k, v, w))
    got = fn(put(q), put(k), put(v), put(w), TokenInfo(*map(put, info)))
  check_close(got, want[:2], "sharded 16x8")


def test_tpu_compile_counts_the_kernel_cost():
  """The same kernels compile for TPU (Mosaic, libtpu compile-only devices) and the compiler counts their
  cost estimate: compiled flops of forward + backward = (4 + 10) B H Tq Tk D (the kernels' matmuls), plus
  the small XLA glue (delta, GQA sums), checked against that formula."""
  from lmfusion_jax.planning import plan
  devices = plan.topology_devices(plan.parse_topology("v5p-8"))
  mesh = sharding.make_mesh(1, len(devices), 1, devices=devices)
  b, s, h, kvh, d = 2 * len(devices), 1024, 4, 2, 128
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch)   # noqa: E731
  q, k, v = sds((b, s, h, d), jnp.bfloat16), sds((b, s, kvh, d), jnp.bfloat16), sds((b, s, kvh, d), jnp.bfloat16)
  info = TokenInfo(*(sds((b, s), jnp.int32) for _ in range(3)))

  def fwd_bwd(q, k, v, info):
    f = lambda q, k, v: flash_attention(q, k, v, info, info).astype(jnp.float32).sum()   # noqa: E731
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(mesh):
    compiled = jax.jit(fwd_bwd).lower(q, k, v, info).compile()
  text = compiled.as_text()
  assert "lmfusion_flash_fwd" in text and "lmfusion_flash_bwd" in text
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  per_device = (4 + 10) * (b // len(devices)) * h * s * s * d
  assert per_device <= ca["flops"] <= 1.02 * per_device, (ca["flops"], per_device)
  # The estimate is flop-bound: at least the kernels' flops at the chip's peak.
  assert ca["optimal_seconds"] >= per_device / 459e12
  assert math.isfinite(ca["optimal_seconds"])


def test_lmfusion_model_with_flash_equals_xla(monkeypatch):
  """The whole LMFusion model on 2 packed rows (row 0: 2 caption-first documents; row 1: 2 image-first
  documents, one caption dropped; 2 images each, padding) with model.attention_impl = flash_interpret
  (blocks 16 x 16 here, so images fill whole blocks: EMPTY, FULL and PARTIAL tiles) vs xla: text logits,
  predicted noise and the gradient of every parameter."""
  from flax import nnx
  from test_fusion import LCFG, fcfg, packed_row, randomize
  from lmfusion_jax.models.fusion import LMFusion
  monkeypatch.setitem(A._IMPLEMENTATIONS, "flash_interpret", lambda q, k, v, qi, ki: flash_attention(
      q, k, v, qi, ki, block_q=16, block_k=16, interpret=True))
  tok, pos, seg, ipos, iseg, _ = packed_row()
  t = pos.shape[1]
  pos1 = [0, 1, 18, 19, 20, 21, 22, 23] + [0, 1, 18, 19]   # BOS BOI <image @2..17> EOI caption EOS; no caption
  seg1 = [1] * 8 + [2] * 4
  pos = jnp.concatenate([pos, jnp.asarray([pos1 + [0] * (t - len(pos1))], jnp.int32)])
  seg = jnp.concatenate([seg, jnp.asarray([seg1 + [0] * (t - len(seg1))], jnp.int32)])
  tok = jnp.concatenate([tok, jnp.roll(tok, 3, axis=1)])
  ipos = jnp.concatenate([ipos, jnp.asarray([[2, 2]], jnp.int32)])
  iseg = jnp.concatenate([iseg, jnp.asarray([[1, 2]], jnp.int32)])
  lat = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 2))
  ts = jnp.full(ipos.shape, 300, jnp.int32)
  outs = {}
  for impl in ("xla", "flash_interpret"):
    model = randomize(LMFusion(LCFG.replace(attention_impl=impl), fcfg(), rngs=nnx.Rngs(0)), seed=3)
    graphdef, state = nnx.split(model)

    def loss(state):
      logits, eps, _ = nnx.merge(graphdef, state)(TextInputs(tok, pos, seg), ImageInputs(lat, ts, ipos, iseg))
      return jnp.sum(jax.nn.log_softmax(logits)[..., 7]) + jnp.sum(eps ** 2), (logits, eps)
    outs[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  (l_x, (lg_x, eps_x)), g_x = outs["xla"]
  (l_f, (lg_f, eps_f)), g_f = outs["flash_interpret"]
  np.testing.assert_allclose(lg_f, lg_x, atol=1e-5, rtol=0)
  np.testing.assert_allclose(eps_f, eps_x, atol=1e-5, rtol=0)
  np.testing.assert_allclose(l_f, l_x, rtol=1e-5)
  flat_x, flat_f = nnx.to_flat_state(g_x), nnx.to_flat_state(g_f)
  worst = 0.0
  for (path, a), (_, b) in zip(flat_x, flat_f):
    a, b = np.asarray(a.value), np.asarray(b.value)
    worst = max(worst, float(np.max(np.abs(a - b) / (1e-4 + 1e-4 * np.abs(a)))))
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=str(path))
  print(f"whole model: max |logits diff| {float(jnp.max(jnp.abs(lg_f - lg_x))):.2e}, max |eps diff| "
        f"{float(jnp.max(jnp.abs(eps_f - eps_x))):.2e}, worst parameter-gradient diff / tolerance {worst:.3f}")
