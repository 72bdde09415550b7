"""LMFusion model checks: text preservation, hybrid-mask semantics, a numpy reference layer, shardings,
and routed FLOPs (issue 3)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmfusion_jax import sharding
from lmfusion_jax.models import decoder, sharded
from lmfusion_jax.models.mask import TokenInfo
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.fusion import LMFusion
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.models.mask import image_info as image_token_info

LCFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                   rope_theta=10000.0, bos_id=1, eos_id=2)


def fcfg(**kw):
  base = dict(image_io="linear", latent_size=4, latent_channels=2, patch_size=1, time_embed_dim=16,
              boi_id=3, eoi_id=4)
  base.update(kw)
  return FusionConfig(**base)


def randomize(model, seed=0, scale=0.3):
  """Replaces every parameter by random values (so zero-init output layers do not hide effects)."""
  state = nnx.state(model)
  leaves, tree = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(tree, new))
  nnx.update(model, state)
  return model


def text_batch(b=2, t=11, seed=0):
  rng = np.random.RandomState(seed)
  tok = jnp.asarray(rng.randint(0, LCFG.vocab_size, (b, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return tok, pos, jnp.ones((b, t), jnp.int32)


@pytest.mark.parametrize("separation,image_io", [("deep", "linear"), ("shallow", "linear"), ("none", "linear"),
                                                 ("deep", "unet")])
@pytest.mark.parametrize("scan", [False, True])
def test_text_only_logits_bitwise_equal_llama(separation, image_io, scan):
  lc = LCFG.replace(scan_layers=scan)
  kw = dict(image_io=image_io, separation=separation)
  if image_io == "unet":
    kw.update(patch_size=2, unet_channels=(8, 16), unet_blocks=1, unet_groups=4)
  model = LMFusion(lc, fcfg(**kw), rngs=nnx.Rngs(0))
  tok, pos, seg = text_batch()
  empty_lat = jnp.zeros((2, 0, 4, 4, 2))
  empty = jnp.zeros((2, 0), jnp.int32)
  fused = jax.jit(lambda m, *a: m(TextInputs(*a[:3]), ImageInputs(*a[3:]))[0])(model, tok, pos, seg, empty_lat,
                                                                                      empty, empty, empty)
  plain = jax.jit(lambda m, *a: m.text(*a)[0])(model, tok, pos, seg)
  np.testing.assert_array_equal(np.asarray(fused), np.asarray(plain))
  assert fused.dtype == jnp.float32


# ---- mask semantics on a hand-built packed row -------------------------------------------------------------
# Row layout (array order is modality-sorted, meaning comes from positions/segments):
#   doc 1 (segment 1): caption tokens at positions 0..4, BOI at 5, image slot 0 at positions 6..21 (16 tokens),
#                      EOI at 22, text at 23..25
#   doc 2 (segment 2): text tokens at positions 0..5, image slot 1 at positions 6..21, EOI 22
N_TOK = 16


def packed_row():
  doc1_txt = list(range(6)) + [22, 23, 24, 25]
  doc2_txt = list(range(6)) + [22]
  pos = doc1_txt + doc2_txt + [0, 0]                   # 2 padding slots at the end
  seg = [1] * len(doc1_txt) + [2] * len(doc2_txt) + [0, 0]
  t = len(pos)
  tok = np.random.RandomState(1).randint(5, LCFG.vocab_size, (1, t))
  return (jnp.asarray(tok, jnp.int32), jnp.asarray([pos], jnp.int32), jnp.asarray([seg], jnp.int32),
          jnp.asarray([[6, 6]], jnp.int32), jnp.asarray([[1, 2]], jnp.int32), len(doc1_txt))


@pytest.fixture(scope="module")
def mask_model():
  return randomize(LMFusion(LCFG, fcfg(), rngs=nnx.Rngs(0)), seed=3)


def run(model, lat, tok, pos, seg, ipos, iseg):
  ts = jnp.full(ipos.shape, 100, jnp.int32)
  return jax.jit(lambda m, *a: m(TextInputs(*a[:3]), ImageInputs(*a[3:]))[:2])(model, tok, pos, seg, lat, ts, ipos,
                                                                                  iseg)


def test_mask_semantics(mask_model):
  tok, pos, seg, ipos, iseg, n1 = packed_row()
  lat = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 2))
  logits, eps = run(mask_model, lat, tok, pos, seg, ipos, iseg)
  logits, eps = np.asarray(logits), np.asarray(eps)
  caption = np.asarray(pos[0] <= 5) & np.asarray(seg[0] == 1)
  later = np.asarray(pos[0] >= 22) & np.asarray(seg[0] == 1)
  doc2 = np.asarray(seg[0] == 2)

  # (a) A different image after the caption leaves the caption's logits unchanged (bitwise).
  lat_b = lat.at[0, 0].set(jax.random.normal(jax.random.key(9), (4, 4, 2)))
  logits_b, eps_b = map(np.asarray, run(mask_model, lat_b, tok, pos, seg, ipos, iseg))
  np.testing.assert_array_equal(logits_b[0, caption], logits[0, caption])
  assert np.abs(logits_b[0, later] - logits[0, later]).max() > 1e-4

  # (b) Changing ONE image token (linear patchify, patch 1: one latent pixel = one token) changes every
  #     token of that image (bidirectional) and later text, nothing earlier, nothing of the other document.
  lat_c = lat.at[0, 0, 2, 3].add(2.0)
  logits_c, eps_c = map(np.asarray, run(mask_model, lat_c, tok, pos, seg, ipos, iseg))
  d_img = np.abs(eps_c[0, 0] - eps[0, 0]).reshape(N_TOK, -1).max(-1)
  assert (d_img > 1e-6).all(), f"some tokens of the image did not see the change: {d_img}"
  per_tok = np.abs(logits_c[0] - logits[0]).max(-1)
  assert (per_tok[later] > 1e-6).all()
  np.testing.assert_array_equal(logits_c[0, caption], logits[0, caption])
  # (c) packed documents are isolated: doc 2 text and doc 2 image are bitwise unchanged.
  np.testing.assert_array_equal(logits_c[0, doc2], logits[0, doc2])
  np.testing.assert_array_equal(eps_c[0, 1], eps[0, 1])
  # and changing doc 2's image does not affect any doc 1 output
  lat_d = lat.at[0, 1].add(1.0)
  logits_d, eps_d = map(np.asarray, run(mask_model, lat_d, tok, pos, seg, ipos, iseg))
  doc1 = np.asarray(seg[0] == 1)
  np.testing.assert_array_equal(logits_d[0, doc1], logits[0, doc1])
  np.testing.assert_array_equal(eps_d[0, 0], eps[0, 0])
  assert np.isfinite(logits).all() and np.isfinite(eps).all()


# ---- an independent numpy reference of one fused layer --------------------------------------------------
def np_rms(x, w, eps):
  return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def np_rope(x, pos, theta):
  """x [s, h, d]: rotate pairs (i, i + d/2) by angle pos * theta^(-2i/d) (HF rotate-half convention)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = pos[:, None] * theta ** (-2.0 * i / d)
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * np.cos(ang) - b * np.sin(ang)
    out[..., i + d // 2] = b * np.cos(ang) + a * np.sin(ang)
  return out


def np_allowed(pq, sq, iq, pk, sk, ik):
  if sq == 0 or sk != sq:
    return False
  return pk <= pq or (iq >= 0 and iq == ik)


def np_fused_layer(cfg, x, is_img, pos, seg, img, tw, iw):
  """Token-by-token: pick the modality's weights per token, full attention with an explicit mask."""
  s, d = x.shape
  h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  q = np.zeros((s, h, hd)); k = np.zeros((s, kvh, hd)); v = np.zeros((s, kvh, hd))
  for i in range(s):
    w = iw if is_img[i] else tw
    hn = np_rms(x[i], w["attn_norm"], cfg.norm_eps)
    q[i] = np.einsum("d,dhk->hk", hn, w["q"]); k[i] = np.einsum("d,dhk->hk", hn, w["k"])
    v[i] = np.einsum("d,dhk->hk", hn, w["v"])
  q = np_rope(q, pos.astype(np.float64), cfg.rope_theta)
  k = np_rope(k, pos.astype(np.float64), cfg.rope_theta)
  att = np.zeros((s, h, hd))
  for i in range(s):
    allowed = np.array([np_allowed(pos[i], seg[i], img[i], pos[j], seg[j], img[j]) for j in range(s)])
    if not allowed.any():
      continue
    for hh in range(h):
      g = hh // (h // kvh)
      logits = k[:, g] @ q[i, hh] / math.sqrt(hd)
      logits = np.where(allowed, logits, -np.inf)
      p = np.exp(logits - logits.max()); p /= p.sum()
      att[i, hh] = p @ v[:, g]
  out = np.zeros_like(x)
  for i in range(s):
    w = iw if is_img[i] else tw
    y = x[i] + np.einsum("hk,hkd->d", att[i], w["o"])
    hn = np_rms(y, w["ffn_norm"], cfg.norm_eps)
    g_ = hn @ w["gate"]; u = hn @ w["up"]
    out[i] = y + (g_ / (1 + np.exp(-g_)) * u) @ w["down"]
  return out


@pytest.mark.parametrize("separation", ["deep", "shallow"])
def test_fused_layer_matches_numpy_reference(separation):
  rng = np.random.RandomState(0)
  cfg = LCFG
  layer_shapes = {"attn_norm": (32,), "q": (32, 4, 8), "k": (32, 2, 8), "v": (32, 2, 8), "o": (4, 8, 32),
                  "ffn_norm": (32,), "gate": (32, 48), "up": (32, 48), "down": (48, 32)}
  tw = {k: (1 + 0.1 * rng.randn(*s) if "norm" in k else 0.2 * rng.randn(*s)) for k, s in layer_shapes.items()}
  iw_all = {k: (1 + 0.1 * rng.randn(*s) if "norm" in k else 0.2 * rng.randn(*s)) for k, s in layer_shapes.items()}
  owned = decoder.IMAGE_LAYER_KEYS[separation]
  iw = {k: iw_all[k] for k in owned}
  # One row: doc 1 = 3 text, an image of 4 tokens, 2 text; doc 2 = 2 text; 1 padding token.
  n_img = 4
  img_pos = np.array([3, 3 + 100])[:1]
  txt_pos = np.array([0, 1, 2, 7, 8, 0, 1, 0]); txt_seg = np.array([1, 1, 1, 1, 1, 2, 2, 0])
  x_img = rng.randn(1, n_img, 32); x_txt = rng.randn(1, 8, 32)
  info_img = image_token_info(jnp.asarray([img_pos]), jnp.asarray([[1]]), n_img)
  info_txt = TokenInfo(jnp.asarray([txt_pos]), jnp.asarray([txt_seg]), jnp.full((1, 8), -1))
  from lmfusion_jax.models import layers as L
  rope_i = L.rope_cos_sin(info_img.positions, cfg); rope_t = L.rope_cos_sin(info_txt.positions, cfg)
  j = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  yi, yt, _ = decoder.fused_layer(decoder.LayerSpec(cfg, separation, "xla"), decoder.Stream(j(x_txt), rope_t),
                                  decoder.Stream(j(x_img), rope_i), decoder.LayerWeights(j(tw), j(iw)),
                                  TokenInfo.concat([info_img, info_txt]))
  # numpy: the sequence in arbitrary (text-first) order, to show order does not matter.
  x = np.concatenate([x_txt[0], x_img[0]])
  is_img = np.array([False] * 8 + [True] * n_img)
  pos = np.concatenate([txt_pos, np.asarray(info_img.positions[0])])
  seg = np.concatenate([txt_seg, np.asarray(info_img.segment_ids[0])])
  img = np.concatenate([-np.ones(8, int), np.asarray(info_img.image_ids[0])])
  iw_used = {k: (iw_all[k] if k in owned else tw[k]) for k in layer_shapes}
  ref = np_fused_layer(cfg, x, is_img, pos, seg, img, tw, iw_used)
  got = np.concatenate([np.asarray(yt[0]), np.asarray(yi[0])])
  real = seg != 0  # padding outputs are unspecified
  assert np.abs(got[real] - ref[real]).max() <= 1e-5


# ---- shardings on an 8-device mesh ------------------------------------------------------------------------
def test_parameter_shapes_dtypes_shardings_on_8_devices():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  lc = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                   param_dtype="bfloat16", bos_id=1, eos_id=2)
  fc = fcfg(image_io="unet", patch_size=2, unet_channels=(16, 32), unet_blocks=1, unet_groups=4,
            latent_channels=4)
  _, params = sharded.init_sharded(lc, fc, mesh)
  names = sharded.logical_names(lc, fc)
  expected_shapes = {
      ("text", "embed"): (128, 64), ("text", "final_norm"): (64,), ("text", "lm_head"): (64, 128),
      ("text", "layers", "q"): (2, 64, 4, 16), ("text", "layers", "k"): (2, 64, 2, 16),
      ("text", "layers", "o"): (2, 4, 16, 64), ("text", "layers", "down"): (2, 96, 64),
      ("image", "layers", "q"): (2, 64, 4, 16), ("image", "final_norm"): (64,)}
  flat = {tuple(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_names = {tuple(str(getattr(k, "key", k)) for k in path): v for path, v in
                jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: isinstance(x, tuple))[0]}
  assert set(flat) == set(flat_names)
  for key, shape in expected_shapes.items():
    assert flat[key].shape == shape, key
  # Declared mapping, spelled out for the main weights:
  P = jax.sharding.PartitionSpec
  assert flat[("text", "embed")].sharding.spec == P("tensor", "fsdp")
  assert flat[("text", "layers", "q")].sharding.spec == P(None, "fsdp", "tensor", None)
  assert flat[("text", "layers", "o")].sharding.spec == P(None, "tensor", None, "fsdp")
  assert flat[("text", "layers", "gate")].sharding.spec == P(None, "fsdp", "tensor")
  assert flat[("image", "layers", "down")].sharding.spec == P(None, "tensor", "fsdp")
  assert flat[("text", "lm_head")].sharding.spec == P("fsdp", "tensor")
  for key, arr in flat.items():
    assert arr.dtype == jnp.bfloat16, key
    want = sharding.logical_to_spec(flat_names[key], mesh, shape=arr.shape)
    assert arr.sharding.spec == want, key
    assert arr.sharding.mesh.shape == mesh.shape
    # the array really is split: each device holds 1/(product of used mesh axes) of it
    used = [a for ax in want if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)]
    frac = int(np.prod([mesh.shape[a] for a in used])) if used else 1
    assert arr.addressable_shards[0].data.size * frac == arr.size, key
  # Every text weight matrix is split over both fsdp and tensor.
  for k in ("q", "k", "v", "o", "gate", "up", "down"):
    spec = flat[("text", "layers", k)].sharding.spec
    assert "fsdp" in spec and "tensor" in spec, k


# ---- routed FLOPs ----------------------------------------------------------------------------------------
def routed_flops_case():
  lc = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512,
                   bos_id=1, eos_id=2)
  fc = FusionConfig(image_io="linear", latent_size=8, latent_channels=4, patch_size=1, time_embed_dim=32)
  return lc, fc


def analytic_forward_flops(lc, fc, b, t, slots):
  """2 x (weights each token uses ONCE) + attention over the whole [image | text] sequence + heads/io."""
  n = slots * fc.tokens_per_image
  s = n + t
  per_token_layer = 2 * (lc.dim * lc.head_dim * (2 * lc.n_heads + 2 * lc.n_kv_heads) + 3 * lc.dim * lc.ffn_dim)
  attn = 2 * 2 * s * s * lc.n_heads * lc.head_dim
  lm_head = 2 * lc.dim * lc.vocab_size * t
  pdim = fc.patch_size ** 2 * fc.latent_channels
  io = 2 * 2 * pdim * lc.dim * n
  return b * (lc.n_layers * (s * per_token_layer + attn) + lm_head + io)


def test_routed_forward_flops_match_analytic_count():
  lc, fc = routed_flops_case()
  b, t, slots = 2, 64, 2
  model = LMFusion(lc, fc, rngs=nnx.Rngs(0))
  gd, st = nnx.split(model)

  def fwd(st, tok, lat, ts):
    m = nnx.merge(gd, st)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t)); seg = jnp.ones((b, t), jnp.int32)
    ipos = jnp.broadcast_to(t + 64 * jnp.arange(slots), (b, slots)); iseg = jnp.ones((b, slots), jnp.int32)
    return m(TextInputs(tok, pos, seg), ImageInputs(lat, ts, ipos, iseg))[:2]

  args = (st, jnp.ones((b, t), jnp.int32), jnp.zeros((b, slots, 8, 8, 4)), jnp.zeros((b, slots), jnp.int32))
  cost = jax.jit(fwd).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = analytic_forward_flops(lc, fc, b, t, slots)
  both_branches = analytic + b * lc.n_layers * (slots * fc.tokens_per_image + t) * (
      2 * (lc.dim * lc.head_dim * (2 * lc.n_heads + 2 * lc.n_kv_heads) + 3 * lc.dim * lc.ffn_dim))
  assert abs(cost["flops"] - analytic) / analytic < 0.10, (cost["flops"], analytic)
  assert cost["flops"] < 0.75 * both_branches


@pytest.mark.parametrize("skips", [True, False])
def test_unet_without_skips_reads_only_the_transformer_tokens(skips):
  """fusion.unet_skips=False: the upsampler's prediction is a function of the transformer's tokens (and t)
  alone, so replacing the downsampler's per-level features changes nothing; with skips it changes the output."""
  from lmfusion_jax.models.image_io import UNetIO
  fc = fcfg(image_io="unet", latent_size=8, patch_size=2, unet_channels=(8, 16), unet_blocks=1, unet_groups=4,
            unet_skips=skips)
  io = randomize(UNetIO(LCFG, fc, rngs=nnx.Rngs(0)))
  lat = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  tokens, feats, temb = io.encode(lat, jnp.array([10, 900]), jnp.float32)       # tokens [2, 16, 32]
  other = [jax.random.normal(jax.random.key(7 + i), f.shape) for i, f in enumerate(feats)]
  eps = io.decode(tokens, feats, temb)                                           # [2, 8, 8, 2]
  eps_other = io.decode(tokens, other, temb)
  assert eps.shape == lat.shape
  assert np.isfinite(np.asarray(eps)).all()
  changed = float(jnp.max(jnp.abs(eps - eps_other)))
  if skips:
    assert changed > 1e-3
  else:
    assert changed == 0.0
    n_in = io.up[0][0].conv1.kernel[...].shape[-2]       # the first up block takes the tokens' width only
    assert n_in == fc.unet_channels[-1]
