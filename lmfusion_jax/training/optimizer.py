"""Optimizer from config: AdamW with warmup + cosine decay, separate learning rates for `text` and `image`,
global-norm clipping, no weight decay on norms and biases.

With eta_text = 0 (the LMFusion recipe) the text branch is not trainable at all: the train step takes
gradients with respect to the image branch only and the optimizer state holds image leaves only.
"""
from __future__ import annotations

import jax
import optax


def lr_schedule(peak: float, final: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> peak, then cosine decay peak -> final at total_steps."""
  if peak == 0.0:
    return optax.constant_schedule(0.0)
  warmup_steps = max(0, min(warmup_steps, total_steps))
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, max(total_steps, 1), alpha=final / peak)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=final)


def trainable_branches(optim_cfg) -> tuple:
  """("image",) when the text learning rate is 0 (frozen text), else ("text", "image")."""
  return ("image",) if float(optim_cfg.text_lr) == 0.0 else ("text", "image")


def _decay_mask(params):
  """True for weight matrices; False for norms, biases and GroupNorm scales (by parameter name)."""
  def keep(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    last = names[-1]
    return not ("norm" in last or last in ("bias", "scale") or any("norm" in n for n in names[-2:-1]))
  return jax.tree_util.tree_map_with_path(keep, params)


def _adamw(optim_cfg, schedule):
  return optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                     weight_decay=optim_cfg.weight_decay, mask=_decay_mask)


def schedules(optim_cfg, total_steps: int) -> dict:
  return {b: lr_schedule(float(optim_cfg[f"{b}_lr"]), float(optim_cfg[f"{b}_final_lr"]),
                         int(optim_cfg.warmup_steps), total_steps) for b in ("text", "image")}


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Transformation over the TRAINABLE params dict ({"image": ...} or {"text": ..., "image": ...})."""
  sched = schedules(optim_cfg, total_steps)
  branches = trainable_branches(optim_cfg)
  inner = optax.multi_transform({b: _adamw(optim_cfg, sched[b]) for b in branches},
                                lambda p: {b: b for b in p})
  parts = []
  if optim_cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
  parts.append(inner)
  return optax.chain(*parts)
