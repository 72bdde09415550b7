"""Routed vs both-branches forward FLOPs (XLA cost analysis) against the analytic routed count.

  python benchmarks/routing_flops.py            # prints a markdown table

The routed model is lmfusion_jax's LMFusion forward. The baseline computes every token through BOTH the text
and the image weights and selects per token with `where` (what design decision 4 rules out).
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models import decoder
from lmfusion_jax.models import layers as L
from lmfusion_jax.models.attention import dot_product_attention
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.fusion import LMFusion
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.models.mask import TokenInfo, image_info, text_info


def analytic(lc, fc, b, t, slots):
  n = slots * fc.tokens_per_image
  s = n + t
  per_tok = 2 * (lc.dim * lc.head_dim * (2 * lc.n_heads + 2 * lc.n_kv_heads) + 3 * lc.dim * lc.ffn_dim)
  attn = 4 * s * s * lc.n_heads * lc.head_dim
  head = 2 * lc.dim * lc.vocab_size * t
  pdim = fc.patch_size ** 2 * fc.latent_channels
  return b * (lc.n_layers * (s * per_tok + attn) + head + 4 * pdim * lc.dim * n), b * lc.n_layers * s * per_tok


def both_branches_stack(lc, text_layers, image_layers, x, is_img, info):
  """Every token through both weight sets, then a per-token select."""
  cos, sin = L.rope_cos_sin(info.positions, lc)
  sel = is_img[:, :, None]
  for i in range(lc.n_layers):
    tw = jax.tree.map(lambda a: a[i], text_layers)
    iw = jax.tree.map(lambda a: a[i], image_layers)
    q, k, v = [jnp.where(sel[..., None], a, b) for a, b in
               zip(decoder._qkv(L.rms_norm(x, iw["attn_norm"], lc.norm_eps), iw, cos, sin),
                   decoder._qkv(L.rms_norm(x, tw["attn_norm"], lc.norm_eps), tw, cos, sin))]
    a = dot_product_attention(q, k, v, info, info)
    x = x + jnp.where(sel, decoder._out(a, iw), decoder._out(a, tw))
    x = x + jnp.where(sel, decoder._ffn(x, iw, lc.norm_eps), decoder._ffn(x, tw, lc.norm_eps))
  return x


def flops_of(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def measure(lc, fc, b, t, slots):
  model = LMFusion(lc, fc, rngs=nnx.Rngs(0))
  gd, st = nnx.split(model)
  n_tok = fc.tokens_per_image
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  ipos = jnp.broadcast_to(t + n_tok * jnp.arange(slots), (b, slots))
  iseg = jnp.ones((b, slots), jnp.int32)
  lat = jnp.zeros((b, slots, fc.latent_size, fc.latent_size, fc.latent_channels))
  ts = jnp.zeros((b, slots), jnp.int32)
  tok = jnp.ones((b, t), jnp.int32)

  def routed(st):
    return nnx.merge(gd, st)(TextInputs(tok, pos, seg), ImageInputs(lat, ts, ipos, iseg))[:2]

  def both(st):
    m = nnx.merge(gd, st)
    img_tok, skips, temb = m.image.io.encode(lat.reshape((b * slots,) + lat.shape[2:]), ts.reshape(-1), jnp.float32)
    x = jnp.concatenate([img_tok.reshape(b, slots * n_tok, -1), m.text.embed_tokens(tok)], axis=1)
    info = TokenInfo.concat([image_info(ipos, iseg, n_tok), text_info(pos, seg)])
    is_img = jnp.arange(x.shape[1])[None, :].repeat(b, 0) < slots * n_tok
    x = both_branches_stack(lc, m.text.layers.arrays(), m.image.layers.arrays(), x, is_img, info)
    logits = m.text.logits(x[:, slots * n_tok:])
    eps = m.image.io.decode(x[:, :slots * n_tok].reshape(b * slots, n_tok, -1), skips, temb)
    return logits, eps

  return flops_of(routed, st), flops_of(both, st)


def main():
  lc = LlamaConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1024,
                   bos_id=1, eos_id=2)
  fc = FusionConfig(image_io="linear", latent_size=16, latent_channels=4, patch_size=2, time_embed_dim=64)
  b, t, slots = 2, 192, 1
  routed, both = measure(lc, fc, b, t, slots)
  ana, proj = analytic(lc, fc, b, t, slots)
  print(f"config: dim {lc.dim}, {lc.n_layers} layers, ffn {lc.ffn_dim}, batch {b} x ({t} text + "
        f"{slots} x {fc.tokens_per_image} image tokens), linear patchify")
  print("| forward | compiled GFLOP | analytic routed GFLOP | compiled / analytic |")
  print("|---|---|---|---|")
  print(f"| routed (LMFusion) | {routed / 1e9:.4f} | {ana / 1e9:.4f} | {routed / ana:.3f} |")
  print(f"| both branches + where | {both / 1e9:.4f} | {ana / 1e9:.4f} | {both / ana:.3f} |")
  print(f"analytic per-token projection/FFN share: {proj / ana:.1%}; both-branches adds it again "
        f"(expected ratio {(ana + proj) / ana:.3f})")


if __name__ == "__main__":
  main()
