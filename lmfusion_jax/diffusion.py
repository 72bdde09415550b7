"""Gaussian diffusion for the image path: schedule, noising, loss, samplers, classifier-free guidance.

Pure JAX functions; no model code. A model enters the samplers as a callable

  eps_fn(x_t, t) -> eps      x_t float [N, ...] (e.g. [N, H, W, C] latents), t int32 [N], eps like x_t

that predicts the noise added to a clean sample (DDPM epsilon prediction). Timesteps are indices into the
training schedule, 0 <= t < num_timesteps (t = 0 is the least noisy level, abar_0 < 1).

Training (per image): t ~ U{caption_first_min_t..T-1} (U{0..image_first_max_t} for image-first examples),
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss = mean over H, W, C of (eps_pred - eps)^2, averaged over
the valid images of the batch.

Sampling runs on a strided subsequence tau_0 < ... < tau_{K-1} of the training timesteps (improved-DDPM
"respacing"): step k uses abar = abar[tau_k] and abar_prev = abar[tau_{k-1}] (1.0 for k = 0), from which the
respaced beta_k = 1 - abar / abar_prev and the posterior variance beta_tilde_k follow. The last step returns
the predicted x0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmfusion_jax.errors import UserError

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("epsilon",)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Diffusion hyper-parameters (hashable: usable as a static jit argument)."""
  num_timesteps: int = 1000
  schedule: str = "cosine"          # "cosine" (Nichol & Dhariwal; diffusers "squaredcos_cap_v2") or "linear"
  cosine_s: float = 0.008           # cosine schedule offset
  max_beta: float = 0.999           # cosine betas are clipped to this
  linear_beta_start: float = 1e-4   # linear schedule endpoints for T = 1000 (scaled by 1000 / T otherwise)
  linear_beta_end: float = 0.02
  loss_weight: float = 5.0          # lambda in  loss = LM + lambda * diffusion
  image_first_max_t: Optional[int] = 500  # t <= this for image-first (understanding) examples; None = no cap
  caption_first_min_t: int = 0      # t >= this for caption-first (generation) examples (0: the paper's U{0..T-1})
  snr_shift: float = 1.0            # SNR_t / snr_shift**2 (Hoogeboom et al. 2023, "simple diffusion": a schedule
                                    # for d x d images shifted by d / d_base); 1 = the schedule as is
  prediction: str = "epsilon"

  def __post_init__(self):
    if self.num_timesteps < 1:
      raise UserError(f"diffusion.num_timesteps={self.num_timesteps}: must be >= 1")
    if self.schedule not in SCHEDULES:
      raise UserError(f"diffusion.schedule={self.schedule!r}: expected one of {SCHEDULES}")
    if self.prediction not in PREDICTIONS:
      raise UserError(f"diffusion.prediction={self.prediction!r}: expected one of {PREDICTIONS}")
    if not 0.0 < self.max_beta < 1.0:
      raise UserError(f"diffusion.max_beta={self.max_beta}: must be in (0, 1)")
    if self.image_first_max_t is not None and not 0 <= self.image_first_max_t < self.num_timesteps:
      raise UserError(f"diffusion.image_first_max_t={self.image_first_max_t}: must be None or in "
                       f"[0, num_timesteps={self.num_timesteps})")
    if isinstance(self.snr_shift, bool) or not isinstance(self.snr_shift, (int, float)) or not (
        math.isfinite(self.snr_shift) and self.snr_shift > 0):
      raise UserError(f"diffusion.snr_shift={self.snr_shift!r}: must be a number > 0")
    if isinstance(self.caption_first_min_t, bool) or not isinstance(self.caption_first_min_t, int) or not (
        0 <= self.caption_first_min_t < self.num_timesteps):
      raise UserError(f"diffusion.caption_first_min_t={self.caption_first_min_t!r}: must be an integer in "
                       f"[0, num_timesteps={self.num_timesteps})")


class Schedule(NamedTuple):
  """The training noise schedule; every field is float32 [num_timesteps]."""
  betas: jax.Array
  alphas: jax.Array                         # 1 - betas
  alphas_cumprod: jax.Array                 # abar_t = prod_{s <= t} alphas_s
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule: beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta), float64 [T]."""
  def alpha_bar(u):
    return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2
  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  return np.minimum(1.0 - alpha_bar(u[1:]) / alpha_bar(u[:-1]), max_beta)


def linear_betas(num_timesteps: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
  """Ho et al. linear schedule (scaled by 1000 / T as in improved DDPM), float64 [T]."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * start, scale * end, num_timesteps, dtype=np.float64)


def make_schedule(cfg: DiffusionConfig) -> Schedule:
  """Builds the schedule (computed in float64 on the host, stored as float32)."""
  if cfg.schedule == "cosine":
    betas = cosine_betas(cfg.num_timesteps, cfg.cosine_s, cfg.max_beta)
  else:
    betas = linear_betas(cfg.num_timesteps, cfg.linear_beta_start, cfg.linear_beta_end)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  if cfg.snr_shift != 1.0:   # abar / (1 - abar) = SNR -> SNR / shift^2; betas follow from the new abar
    snr = abar / (1.0 - abar) / float(cfg.snr_shift) ** 2
    abar = snr / (1.0 + snr)
    alphas = abar / np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - alphas
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(betas=f32(betas), alphas=f32(alphas), alphas_cumprod=f32(abar),
                  sqrt_alphas_cumprod=f32(np.sqrt(abar)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)))


# ---------------------------------------------------------------------------------------------- training


def sample_timesteps(rng: jax.Array, capped: jax.Array, cfg: DiffusionConfig) -> jax.Array:
  """One uniform integer timestep per element of `capped` (e.g. bool [B, I] = batch["image_first"]).

  t ~ U{caption_first_min_t, ..., num_timesteps - 1}; where `capped` is True and cfg.image_first_max_t is
  set, t ~ U{0, ..., image_first_max_t} instead (image-first elements always start at 0). Returns int32 with the
  shape of `capped`.
  """
  capped = jnp.asarray(capped, jnp.bool_)
  high = jnp.full(capped.shape, cfg.num_timesteps, jnp.int32)
  low = jnp.where(capped, jnp.int32(0), jnp.int32(cfg.caption_first_min_t))
  if cfg.image_first_max_t is not None:
    high = jnp.where(capped, jnp.int32(cfg.image_first_max_t + 1), high)
  return jax.random.randint(rng, capped.shape, low, high, dtype=jnp.int32)


def _per_leading(coef: jax.Array, t: jax.Array, x: jax.Array, name: str) -> jax.Array:
  """coef[t] reshaped to broadcast against x, whose leading dims are t's."""
  if x.shape[:t.ndim] != t.shape:
    raise ValueError(f"{name} has shape {x.shape}; its leading dims must equal the timestep shape {t.shape}")
  return coef[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

  x0, noise: [..., H, W, C] (any trailing dims); t: int [...] = the leading dims of x0. Result in x0.dtype.
  """
  t = jnp.asarray(t, jnp.int32)
  if noise.shape != x0.shape:
    raise ValueError(f"q_sample: noise has shape {noise.shape}, x0 has shape {x0.shape}")
  a = _per_leading(schedule.sqrt_alphas_cumprod, t, x0, "q_sample x0")
  b = _per_leading(schedule.sqrt_one_minus_alphas_cumprod, t, x0, "q_sample x0")
  x_t = a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)
  return x_t.astype(x0.dtype)


def noise_images(rng: jax.Array, schedule: Schedule, x0: jax.Array, capped: jax.Array,
                 cfg: DiffusionConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training inputs for clean latents x0 [B, I, H, W, C] and capped bool [B, I] (image-first slots).

  Returns (x_t [B, I, H, W, C], t int32 [B, I], eps [B, I, H, W, C]); eps is the regression target.
  """
  t_rng, eps_rng = jax.random.split(rng)
  t = sample_timesteps(t_rng, capped, cfg)
  eps = jax.random.normal(eps_rng, x0.shape, jnp.float32).astype(x0.dtype)
  return q_sample(schedule, x0, t, eps), t, eps


def diffusion_loss(eps_pred: jax.Array, eps: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image MSE, averaged over valid images.

  eps_pred, eps: [B, I, H, W, C] (any trailing dims after valid's); valid: bool [B, I].
  Returns (loss float32 scalar, num_valid float32 scalar). No valid image -> loss 0.0.
  """
  if eps_pred.shape != eps.shape:
    raise ValueError(f"diffusion_loss: eps_pred has shape {eps_pred.shape}, eps has shape {eps.shape}")
  valid = jnp.asarray(valid)
  if eps.shape[:valid.ndim] != valid.shape:
    raise ValueError(f"diffusion_loss: valid has shape {valid.shape}; must equal the leading dims of {eps.shape}")
  sq = jnp.square(eps_pred.astype(jnp.float32) - eps.astype(jnp.float32))
  per_image = jnp.mean(sq, axis=tuple(range(valid.ndim, sq.ndim)))  # [B, I]
  w = valid.astype(jnp.float32)
  num_valid = jnp.sum(w)
  loss = jnp.sum(per_image * w) / jnp.maximum(num_valid, 1.0)
  return loss, num_valid


# ---------------------------------------------------------------------------------------------- sampling


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly strided subsequence of training timesteps, ascending, int32 [num_steps], including T-1.

  As improved-DDPM `space_timesteps(T, [K])`: round(linspace(0, T-1, K)); K = 1 gives [T-1].
  """
  if not 1 <= num_steps <= num_timesteps:
    raise UserError(f"num_steps={num_steps}: must be in [1, num_timesteps={num_timesteps}]")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)


def _check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> np.ndarray:
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
    raise UserError(f"timesteps must be a non-empty 1-D integer sequence, got {timesteps!r}")
  if ts[0] < 0 or ts[-1] >= num_timesteps or np.any(np.diff(ts) <= 0):
    raise UserError(f"timesteps must be strictly increasing within [0, {num_timesteps}), got {ts.tolist()}")
  return ts.astype(np.int32)


def _predict_x0(x_t, eps, abar, clip_x0):
  x0 = (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
  return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def ddpm_step(x_t: jax.Array, eps: jax.Array, abar: jax.Array, abar_prev: jax.Array, noise: jax.Array,
              clip_x0: Optional[float] = None) -> jax.Array:
  """One ancestral step x_t -> x_prev of the (respaced) chain; abar_prev = 1 on the last step.

  x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (optionally clipped), beta = 1 - abar / abar_prev,
  mean = sqrt(abar_prev) beta / (1 - abar) x0_hat + sqrt(1 - beta) (1 - abar_prev) / (1 - abar) x_t,
  x_prev = mean + sqrt(beta_tilde) noise, beta_tilde = (1 - abar_prev) / (1 - abar) beta (0 on the last step).
  """
  x0 = _predict_x0(x_t, eps, abar, clip_x0)
  alpha = abar / abar_prev
  beta = 1.0 - alpha
  coef_x0 = jnp.sqrt(abar_prev) * beta / (1.0 - abar)
  coef_xt = jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)
  var = (1.0 - abar_prev) / (1.0 - abar) * beta
  return coef_x0 * x0 + coef_xt * x_t + jnp.sqrt(var) * noise


def ddim_step(x_t: jax.Array, eps: jax.Array, abar: jax.Array, abar_prev: jax.Array, noise: jax.Array,
              eta: float = 0.0, clip_x0: Optional[float] = None) -> jax.Array:
  """One DDIM step (Song et al. eq. 12); eta = 1 gives the ancestral (DDPM) step's distribution.

  sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev));
  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma noise, where eps_hat is
  re-derived from the clipped x0_hat when clipping.
  """
  x0 = _predict_x0(x_t, eps, abar, clip_x0)
  if clip_x0 is not None:
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0))
  return jnp.sqrt(abar_prev) * x0 + direction * eps + sigma * noise


def _run_chain(step_fn, eps_fn: EpsFn, schedule: Schedule, rng: jax.Array, shape: Sequence[int],
               timesteps: np.ndarray, x_T: Optional[jax.Array]) -> jax.Array:
  """Runs x_T -> x0 over `timesteps` (ascending) from the last to the first with lax.scan. `rng`: one key, or
  a key per row ([N], e.g. folded from each image's id) so an image does not depend on its batch."""
  shape = tuple(shape) if x_T is None else tuple(x_T.shape)
  if len(shape) < 1:
    raise ValueError(f"sample shape {shape} needs a leading batch dim")
  ts = jnp.asarray(timesteps, jnp.int32)                              # [K]
  abar = schedule.alphas_cumprod[ts]                                 # [K]
  abar_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), abar[:-1]])
  if rng.ndim == 0:      # one key for the whole batch
    init_rng, steps_rng = jax.random.split(rng)
    draw = lambda key: jax.random.normal(key, shape, jnp.float32)
    keys = jax.random.split(steps_rng, len(timesteps))                # [K]
  else:                  # a key per row [N]: each row's noise is independent of the rest of the batch
    if rng.shape != (shape[0],):
      raise ValueError(f"per-row keys {rng.shape} do not match the batch of {shape[0]}")
    split = jax.vmap(jax.random.split)(rng)                          # [N, 2]
    init_rng, steps_rng = split[:, 0], split[:, 1]
    draw = jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))
    keys = jax.vmap(lambda k: jax.random.split(k, len(timesteps)))(steps_rng).T   # [K, N]
  x = draw(init_rng) if x_T is None else jnp.asarray(x_T, jnp.float32)

  def body(x, inp):
    t, a, a_prev, key = inp
    eps = eps_fn(x, jnp.full((shape[0],), t, jnp.int32)).astype(jnp.float32)
    noise = draw(key)  # unused on the last step (abar_prev = 1 -> std 0)
    return step_fn(x, eps, a, a_prev, noise), None

  xs = (ts[::-1], abar[::-1], abar_prev[::-1], keys[::-1])
  x, _ = jax.lax.scan(body, x, xs)
  return x


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, rng: jax.Array, shape: Sequence[int], num_steps: int = 250,
                *, timesteps: Optional[Sequence[int]] = None, x_T: Optional[jax.Array] = None,
                clip_x0: Optional[float] = None) -> jax.Array:
  """Ancestral DDPM sampling (posterior variance beta_tilde) on a respaced chain; returns x0 float32 [*shape].

  The chain uses `sampling_timesteps(T, num_steps)` unless `timesteps` (strictly increasing training
  timesteps) is given. `x_T` (float [N, ...]) replaces the initial N(0, I) draw (then `shape` is ignored).
  `clip_x0` clips the predicted x0 to [-clip_x0, clip_x0] (off by default: latents are unbounded).
  Jittable with eps_fn, shape, num_steps, timesteps, clip_x0 static.
  """
  ts = (sampling_timesteps(schedule.num_timesteps, num_steps) if timesteps is None
        else _check_timesteps(timesteps, schedule.num_timesteps))
  step = lambda x, e, a, ap, n: ddpm_step(x, e, a, ap, n, clip_x0)
  return _run_chain(step, eps_fn, schedule, rng, shape, ts, x_T)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, rng: jax.Array, shape: Sequence[int], num_steps: int = 50,
                eta: float = 0.0, *, timesteps: Optional[Sequence[int]] = None, x_T: Optional[jax.Array] = None,
                clip_x0: Optional[float] = None) -> jax.Array:
  """DDIM sampling (eta = 0: deterministic given x_T); same chain/arguments as `ddpm_sample`."""
  ts = (sampling_timesteps(schedule.num_timesteps, num_steps) if timesteps is None
        else _check_timesteps(timesteps, schedule.num_timesteps))
  step = lambda x, e, a, ap, n: ddim_step(x, e, a, ap, n, eta, clip_x0)
  return _run_chain(step, eps_fn, schedule, rng, shape, ts, x_T)


# ---------------------------------------------------------------------------------------------- guidance


def cfg_combine(eps_cond: jax.Array, eps_uncond: jax.Array, scale) -> jax.Array:
  """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond) (scale = 1: conditional only)."""
  return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps_fn(eps_batch_fn: EpsFn, scale) -> EpsFn:
  """Wraps a 2N-row model into a guided N-row eps_fn evaluated in ONE model call.

  eps_batch_fn(x [2N, ...], t int32 [2N]) must treat rows [0, N) as conditional (caption present) and rows
  [N, 2N) as unconditional (caption dropped); the returned eps_fn(x [N, ...], t [N]) feeds it x and t
  twice, concatenated along the batch, and combines the halves with `cfg_combine`.
  """
  def eps_fn(x_t, t):
    n = x_t.shape[0]
    eps = eps_batch_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0))
    if eps.shape[0] != 2 * n:
      raise ValueError(f"guided_eps_fn: eps_batch_fn returned {eps.shape[0]} rows for a batch of {2 * n}")
    return cfg_combine(eps[:n], eps[n:], scale)
  return eps_fn
