"""FLOP conventions in one place: analytic FLOPs of LMFusion train steps (for MFU and for checking compiled cost
analyses), the image in/out modules' FLOPs, the two model-FLOPs conventions the plan reports, and the chips'
peak FLOP/s.

Matmul FLOPs are 2 x (weights a token passes through). Each token passes through ONE modality's weights.
Training: forward (2x) + activation gradients (2x) for every token + weight gradients (2x) only for weights
that are trainable. Attention (QK^T and PV over the whole packed row, as the XLA kernel computes it) is
4 * S^2 * heads * head_dim per layer forward, x3 for training.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models.image_io import make_image_io
from lmfusion_jax.models.decoder import IMAGE_LAYER_KEYS


def layer_weight_counts(lcfg: LlamaConfig) -> dict:
  d, hd = lcfg.dim, lcfg.head_dim
  return {"attn_norm": 0, "ffn_norm": 0, "q": d * lcfg.n_heads * hd, "k": d * lcfg.n_kv_heads * hd,
          "v": d * lcfg.n_kv_heads * hd, "o": lcfg.n_heads * hd * d, "gate": d * lcfg.ffn_dim,
          "up": d * lcfg.ffn_dim, "down": lcfg.ffn_dim * d}


def per_token_layer_weights(lcfg: LlamaConfig) -> int:
  return sum(layer_weight_counts(lcfg).values())


def train_step_flops(lcfg: LlamaConfig, fcfg: FusionConfig, batch: int, text_len: int, image_slots: int,
                     text_trainable: bool, io_flops_per_image: float = 0.0) -> dict:
  """Analytic FLOPs of one training step on [batch] rows of text_len text slots + image_slots images."""
  n_img = image_slots * fcfg.tokens_per_image
  s = text_len + n_img
  counts = layer_weight_counts(lcfg)
  w_layer = sum(counts.values())
  img_owned = sum(counts[k] for k in IMAGE_LAYER_KEYS[fcfg.separation])
  # forward + activation grads: 4 x weights per token, every token
  fwd_bwd_act = 4 * w_layer * s * lcfg.n_layers
  # weight grads: image tokens -> image-owned weights always trainable; text-weights used by image tokens
  # (shallow/none) and by text tokens only when the text is trainable.
  wgrad = 2 * img_owned * n_img * lcfg.n_layers
  if text_trainable:
    wgrad += 2 * (w_layer - img_owned) * n_img * lcfg.n_layers + 2 * w_layer * text_len * lcfg.n_layers
  attn = 3 * 4 * s * s * lcfg.n_heads * lcfg.head_dim * lcfg.n_layers
  head = (4 + (2 if text_trainable else 0)) * lcfg.dim * lcfg.vocab_size * text_len
  per_row = fwd_bwd_act + wgrad + attn + head + 3 * io_flops_per_image * image_slots
  text_wgrad_share = 2 * w_layer * text_len * lcfg.n_layers + 2 * lcfg.dim * lcfg.vocab_size * text_len
  return {"total": batch * per_row, "attention": batch * attn,
          "text_weight_grad_share": batch * text_wgrad_share}


# Peak dense bf16 FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
  """0.0 when unknown (e.g. CPU) and not overridden: MFU is then not reported."""
  if override:
    return float(override)
  for k in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(k):
      return PEAK_FLOPS[k]
  return 0.0


def image_io_flops_per_image(lcfg: LlamaConfig, fcfg: FusionConfig) -> float:
  """Forward FLOPs of the image in/out modules (U-Net down + up, or linear patchify) for one image, from
  XLA's cost analysis of the lowered module (CPU, nothing allocated)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_image_io(lcfg, fcfg, rngs=nnx.Rngs(0))))
  dtype = lcfg.jnp_dtype

  def fwd(state, latents, t):
    io = nnx.merge(graphdef, state)
    tokens, skips, temb = io.encode(latents, t, dtype)
    return io.decode(tokens, skips, temb)

  lat = jax.ShapeDtypeStruct((1, fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    ca = jax.jit(fwd).lower(state, lat, t).cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float((ca or {}).get("flops", 0.0))


def model_flops(lcfg: LlamaConfig, fcfg: FusionConfig, data_cfg, text_trainable: bool,
                io_flops_per_image: float = 0.0) -> dict:
  """Model FLOPs of one step under both conventions (see the module docstring)."""
  b, t, i = int(data_cfg.global_batch_size), int(data_cfg.text_len), int(data_cfg.image_slots)
  n_img = i * fcfg.tokens_per_image
  required = train_step_flops(lcfg, fcfg, b, t, i, text_trainable, io_flops_per_image)
  w_layer = per_token_layer_weights(lcfg)
  active_text = lcfg.n_layers * w_layer + lcfg.dim * lcfg.vocab_size   # layers + LM head
  active_image = lcfg.n_layers * w_layer
  six_nd = 6 * b * (active_text * t + active_image * n_img)
  six_nd_attn = six_nd + required["attention"] + 3 * b * i * io_flops_per_image
  return {"required": float(required["total"]), "six_nd": float(six_nd), "six_nd_attn": float(six_nd_attn),
          "attention": float(required["attention"]), "active_params_text_token": active_text,
          "active_params_image_token": active_image}
