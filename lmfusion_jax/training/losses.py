"""The LMFusion training objective on a packed batch: LM cross-entropy + lambda * diffusion MSE."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmfusion_jax import diffusion
from lmfusion_jax.models.inputs import ImageInputs, TextInputs


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """Mean next-token NLL over positions where loss_mask is set. logits fp32 [B, T, V]; targets [B, T].

  Returns (mean loss, number of target tokens, summed NLL)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  n = jnp.sum(mask)
  total = jnp.sum(nll * mask)
  return total / jnp.maximum(n, 1.0), n, total


def fusion_loss(model, batch: dict, rng: jax.Array, schedule: diffusion.Schedule,
                dcfg: diffusion.DiffusionConfig, timesteps: jax.Array | None = None):
  """Noises the batch's latents (t per image, capped for image-first examples), runs the model and returns
  (total loss, metrics). `timesteps` [B, I] overrides the random t (evaluation at fixed t)."""
  latents = batch["latents"]
  if timesteps is None:
    x_t, t, eps = diffusion.noise_images(rng, schedule, latents, batch["image_first"], dcfg)
  else:
    t = timesteps.astype(jnp.int32)
    eps = jax.random.normal(rng, latents.shape, jnp.float32).astype(latents.dtype)
    x_t = diffusion.q_sample(schedule, latents, t, eps)
  logits, eps_pred, _ = model(TextInputs.from_batch(batch), ImageInputs.from_batch(batch, x_t, t))
  text_loss, n_tok, nll_sum = lm_loss(logits, batch["targets"], batch["loss_mask"])
  image_loss, n_img = diffusion.diffusion_loss(eps_pred, eps, batch["image_segment_ids"] > 0)
  total = text_loss + dcfg.loss_weight * image_loss
  metrics = {"loss": total, "text_loss": text_loss, "image_loss": image_loss, "text_tokens": n_tok,
             "images": n_img, "text_nll_sum": nll_sum}
  return total, metrics
