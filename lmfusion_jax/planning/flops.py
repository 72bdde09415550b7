"""Analytic FLOPs of LMFusion forward and train steps (for MFU and for checking compiled cost analyses).

Matmul FLOPs are 2 x (weights a token passes through). Each token passes through ONE modality's weights.
Training: forward (2x) + activation gradients (2x) for every token + weight gradients (2x) only for weights
that are trainable. Attention (QK^T and PV over the whole packed row, as the XLA kernel computes it) is
4 * S^2 * heads * head_dim per layer forward, x3 for training.
"""
from __future__ import annotations

from lmfusion_jax.models.config import FusionConfig, LlamaConfig
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
