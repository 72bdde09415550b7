"""FLOP conventions in one place: analytic FLOPs of LMFusion train steps, the MFU conventions the plan reports,
the image in/out modules' FLOPs, and the chips' peak FLOP/s.

Matmul FLOPs are 2 x (weights a token passes through). Each token passes through ONE modality's weights.

Two model-FLOPs conventions (MFU = model FLOPs / (step time x peak FLOP/s x chips)):
  "maxtext"   MaxText's `maxtext_utils.calculate_tflops_training_per_device` for a dense decoder, the reference
              trainer's own convention, written out (`maxtext_training_flops`): every token of the row counted as
              a text token of a dense Llama whose weights all train, attention halved for the causal mask:
                ffn        = 2 B S F E x 2 (gate, up: one per MLP activation) + 2 B S F E (down)
                qkv        = 2 B S E (Hq + 2 Hkv) D
                projection = 2 B S E Hq D
                embedding  = 2 B S E V                      (the LM head; the input lookup is not a matmul)
                attention  = 4 B S^2 Hq D / 2               (QK^T and PV, causal: half)
                total      = 3 x ((ffn + qkv + projection) x L + embedding) + 3 x attention x L
              (MaxText works per device with per_device_batch_size; here B is the global batch, which is the
              same MFU.) For Llama-3-8B this is 6 x 7.50B (the layers and the LM head) per token + attention.
  "required"  what the step must compute (`train_step_flops`): forward (2x) and activation gradients (2x) for
              every token, weight gradients (2x) only for trainable weights (so 4x for frozen ones, 6x for
              trained ones), the LM head on text positions only, the image in/out modules, and attention
              halved for the causal mask (the images' bidirectional blocks are a small addition the
              convention leaves out, as MaxText leaves them out for its VLMs).
Hardware FLOPs utilization ("hfu") uses the compiled program's FLOPs instead (what the kernels really run).
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


def attention_flops(lcfg: LlamaConfig, seq_len: int, mask: str = "causal") -> float:
  """Forward attention FLOPs of one row over all layers: QK^T and PV over the S x S scores (4 S^2 H D), halved
  for mask="causal" (what the step must compute); mask="full" is what the XLA reference kernel computes."""
  if mask not in ("causal", "full"):
    raise ValueError(f"mask={mask!r}: 'causal' or 'full'")
  full = 4 * seq_len * seq_len * lcfg.n_heads * lcfg.head_dim * lcfg.n_layers
  return full / 2 if mask == "causal" else full


def maxtext_training_flops(lcfg: LlamaConfig, batch: int, seq_len: int) -> dict:
  """MaxText's training FLOPs of one step (the module docstring): {"total", "learnable_weight", "attention"}."""
  b, s, e, f, v = batch, seq_len, lcfg.dim, lcfg.ffn_dim, lcfg.vocab_size
  hq, hkv, d, n = lcfg.n_heads, lcfg.n_kv_heads, lcfg.head_dim, lcfg.n_layers
  ffn = 2 * b * s * f * e * 2 + 2 * b * s * f * e
  qkv = 2 * b * s * e * (hq + 2 * hkv) * d
  projection = 2 * b * s * e * hq * d
  embedding = 2 * b * s * e * v
  attention = 4 * b * s * s * hq * d / 2
  learnable = ((ffn + qkv + projection) * n + embedding) * 3
  attn = attention * n * 3
  return {"total": float(learnable + attn), "learnable_weight": float(learnable), "attention": float(attn)}


def train_step_flops(lcfg: LlamaConfig, fcfg: FusionConfig, batch: int, text_len: int, image_slots: int,
                     text_trainable: bool, io_flops_per_image: float = 0.0, attention: str = "causal") -> dict:
  """Analytic FLOPs of one training step on [batch] rows of text_len text slots + image_slots images;
  `attention`: "causal" (required FLOPs) or "full" (as the XLA reference attention computes it)."""
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
  attn = 3 * attention_flops(lcfg, s, attention)
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
  seq = t + i * fcfg.tokens_per_image
  required = train_step_flops(lcfg, fcfg, b, t, i, text_trainable, io_flops_per_image)
  maxtext = maxtext_training_flops(lcfg, b, seq)
  return {"required": float(required["total"]), "maxtext": maxtext["total"],
          "attention": float(required["attention"]), "maxtext_attention": maxtext["attention"]}
