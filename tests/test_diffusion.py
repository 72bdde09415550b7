"""lmfusion_jax.diffusion against independent references: diffusers schedulers (torch), numpy formulas,
and data whose optimal noise prediction is known in closed form (a point, a Gaussian, a Gaussian mixture)."""
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from lmfusion_jax import diffusion as dif
from lmfusion_jax.errors import UserError

T = 1000


def reference_cosine_betas(num_steps=T, s=0.008, max_beta=0.999):
  """Nichol & Dhariwal eq. 17, written out as a plain loop."""
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)])


REF_ABAR = np.cumprod(1.0 - reference_cosine_betas())  # float64 [T]


def diffusers_ddpm(**kw):
  return diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                 variance_type="fixed_small", prediction_type="epsilon", **kw)


# ---- closed-form optimal eps for 1-D data: p(x0) = sum_i w_i N(mu_i, s_i^2) -------------------------------

MIXTURE = dict(w=np.array([0.3, 0.7]), mu=np.array([-2.0, 1.0]), s=np.array([0.3, 0.6]))


def mixture_eps_fn(w, mu, s, abar_table=REF_ABAR):
  """E[eps | x_t] for x_t = sqrt(abar) x0 + sqrt(1-abar) eps with x0 from the mixture (x: [N, 1])."""
  abar_table = jnp.asarray(abar_table, jnp.float32)
  w, mu, s = (jnp.asarray(a, jnp.float32) for a in (w, mu, s))

  def eps_fn(x, t):
    a = abar_table[t][:, None, None]                     # [N, 1, 1]
    m = jnp.sqrt(a) * mu                                 # [N, 1, K]
    v = a * s ** 2 + (1 - a)
    xk = x[..., None]                                    # [N, 1, 1]
    logr = jnp.log(w) - 0.5 * jnp.log(v) - (xk - m) ** 2 / (2 * v)
    r = jax.nn.softmax(logr, axis=-1)
    return jnp.sqrt(1 - a)[..., 0] * jnp.sum(r * (xk - m) / v, axis=-1)
  return eps_fn


def mixture_cdf(x, w, mu, s):
  return sum(wi * scipy.stats.norm.cdf(x, mi, si) for wi, mi, si in zip(w, mu, s))


# ---- schedule and noising ---------------------------------------------------------------------------------


def test_cosine_schedule_matches_diffusers_and_formula():
  sched = dif.make_schedule(dif.DiffusionConfig())
  ref = diffusers_ddpm()
  np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(sched.betas), reference_cosine_betas(), atol=1e-6, rtol=0)
  assert float(sched.betas[-1]) == pytest.approx(0.999)          # the cap is active at the end
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sched.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - REF_ABAR), atol=1e-6)
  assert sched.num_timesteps == T


def test_linear_schedule_matches_diffusers():
  sched = dif.make_schedule(dif.DiffusionConfig(schedule="linear"))
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
  np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), atol=1e-7, rtol=0)
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6, rtol=1e-5)


def test_q_sample_matches_numpy_and_diffusers_add_noise():
  sched = dif.make_schedule(dif.DiffusionConfig())
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)     # [B, I, H, W, C]
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([[0, 499, 999], [1, 250, 750]], np.int32)        # [B, I]
  got = np.asarray(dif.q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
  a = REF_ABAR[t][..., None, None, None]
  np.testing.assert_allclose(got, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, atol=1e-5)
  ref = diffusers_ddpm().add_noise(torch.from_numpy(x0.reshape(6, 4, 4, 5)), torch.from_numpy(noise.reshape(6, 4, 4, 5)),
                                   torch.from_numpy(t.reshape(6).astype(np.int64)))
  np.testing.assert_allclose(got.reshape(6, 4, 4, 5), ref.numpy(), atol=1e-5)
  # bf16 latents stay bf16
  assert dif.q_sample(sched, jnp.asarray(x0, jnp.bfloat16), t, jnp.asarray(noise, jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="leading dims"):
    dif.q_sample(sched, jnp.asarray(x0), jnp.zeros((3, 2), jnp.int32), jnp.asarray(noise))


def test_noise_images_is_consistent_with_q_sample_and_cap():
  cfg = dif.DiffusionConfig()
  sched = dif.make_schedule(cfg)
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 2, 2, 3)), jnp.float32)
  capped = jnp.asarray(np.arange(32).reshape(4, 8) % 2 == 0)
  x_t, t, eps = dif.noise_images(jax.random.key(0), sched, x0, capped, cfg)
  assert t.shape == (4, 8) and t.dtype == jnp.int32 and eps.shape == x0.shape
  assert int(jnp.max(jnp.where(capped, t, 0))) <= cfg.image_first_max_t
  a = REF_ABAR[np.asarray(t)][..., None, None, None]
  np.testing.assert_allclose(np.asarray(x_t), np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(eps),
                             atol=1e-5)


def test_sample_timesteps_uniform_and_capped_only_where_capped():
  cfg = dif.DiffusionConfig()                                      # T = 1000, cap 500
  n = 200_000
  capped = jnp.asarray(np.arange(n) % 2 == 0).reshape(1000, 200)
  t = np.asarray(dif.sample_timesteps(jax.random.key(3), capped, cfg))
  assert t.shape == capped.shape and t.dtype == np.int32
  cap_t, free_t = t[np.asarray(capped)], t[~np.asarray(capped)]
  assert cap_t.min() == 0 and cap_t.max() == 500                   # inclusive cap is reached, never exceeded
  assert free_t.min() == 0 and free_t.max() == 999 and (free_t > 500).mean() > 0.45

  def chi2_ok(samples, high, bins=20):                             # H0: uniform on {0..high-1}
    counts = np.bincount(samples * bins // high, minlength=bins)
    expected = np.array([np.sum((np.arange(high) * bins // high) == b) for b in range(bins)]) * len(samples) / high
    stat = np.sum((counts - expected) ** 2 / expected)
    return stat < scipy.stats.chi2.ppf(0.999, bins - 1)
  assert chi2_ok(cap_t, 501) and chi2_ok(free_t, 1000)

  no_cap = np.asarray(dif.sample_timesteps(jax.random.key(4), capped, dif.DiffusionConfig(image_first_max_t=None)))
  assert no_cap[np.asarray(capped)].max() == 999 and chi2_ok(no_cap[np.asarray(capped)], 1000)

  # caption_first_min_t: generation examples U{min..T-1}, image-first ones keep U{0..cap} (or U{0..T-1})
  for cap in (500, None):
    split = np.asarray(dif.sample_timesteps(jax.random.key(5), capped,
                                            dif.DiffusionConfig(caption_first_min_t=600, image_first_max_t=cap)))
    gen, und = split[~np.asarray(capped)], split[np.asarray(capped)]
    assert gen.min() == 600 and gen.max() == 999 and chi2_ok(gen - 600, 400)
    assert und.min() == 0 and und.max() == (999 if cap is None else cap)
  for bad in (-1, 1000, 2.5, True):
    with pytest.raises(UserError, match="caption_first_min_t"):
      dif.DiffusionConfig(caption_first_min_t=bad)


def test_diffusion_loss_per_image_average_and_empty():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(2, 3, 4, 4, 2)).astype(np.float32)
  eps = rng.normal(size=pred.shape).astype(np.float32)
  valid = np.array([[True, False, True], [False, False, True]])
  loss, num = dif.diffusion_loss(jnp.asarray(pred), jnp.asarray(eps), jnp.asarray(valid))
  per_image = [np.mean((pred[b, i] - eps[b, i]) ** 2) for b in range(2) for i in range(3) if valid[b, i]]
  assert float(num) == 3.0
  np.testing.assert_allclose(float(loss), np.mean(per_image), rtol=1e-6)

  none = jnp.zeros((2, 3), bool)
  loss0, num0 = dif.diffusion_loss(jnp.asarray(pred), jnp.asarray(eps), none)
  assert float(loss0) == 0.0 and float(num0) == 0.0
  grad = jax.grad(lambda p: dif.diffusion_loss(p, jnp.asarray(eps), none)[0])(jnp.asarray(pred))
  assert np.all(np.asarray(grad) == 0.0)                           # no NaN from 0/0
  with pytest.raises(ValueError, match="valid has shape"):
    dif.diffusion_loss(jnp.asarray(pred), jnp.asarray(eps), jnp.ones((3, 2), bool))


# ---- single steps against diffusers -------------------------------------------------------------------------


def reference_space_timesteps(num_timesteps, count):
  """improved-diffusion `space_timesteps(T, [count])` for one section."""
  frac_stride = 1 if count == 1 else (num_timesteps - 1) / (count - 1)
  cur, taken = 0.0, []
  for _ in range(count):
    taken.append(num_timesteps - 1 if count == 1 else round(cur))  # K=1: we start from pure noise (T-1)
    cur += frac_stride
  return sorted(set(taken))


@pytest.mark.parametrize("k", [1, 7, 50, 250, 1000])
def test_sampling_timesteps_match_improved_ddpm_spacing(k):
  got = dif.sampling_timesteps(T, k)
  assert got.tolist() == reference_space_timesteps(T, k) and len(got) == k


def test_ddpm_step_matches_diffusers_step():
  sched = dif.make_schedule(dif.DiffusionConfig())
  ts = dif.sampling_timesteps(T, 250)                              # ascending
  ref = diffusers_ddpm()
  ref.set_timesteps(timesteps=ts[::-1].tolist())
  rng = np.random.default_rng(5)
  for k in [249, 248, 120, 1, 0]:                                  # incl. the top step and the final (noise-free) one
    x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = rng.normal(size=x.shape).astype(np.float32)
    out = ref.step(torch.from_numpy(eps), int(ts[k]), torch.from_numpy(x),
                   generator=torch.Generator().manual_seed(k)).prev_sample.numpy()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k)).numpy()
    abar = sched.alphas_cumprod[ts[k]]
    abar_prev = sched.alphas_cumprod[ts[k - 1]] if k > 0 else jnp.float32(1.0)
    got = dif.ddpm_step(jnp.asarray(x), jnp.asarray(eps), abar, abar_prev, jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), out, atol=2e-4, rtol=1e-4, err_msg=f"step k={k} t={ts[k]}")


@pytest.mark.parametrize("eta,clip", [(0.0, None), (1.0, None), (0.5, 1.0)])
def test_ddim_step_matches_diffusers_step(eta, clip):
  sched = dif.make_schedule(dif.DiffusionConfig())
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True,
                                clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                                timestep_spacing="leading", steps_offset=0, prediction_type="epsilon")
  ref.set_timesteps(50)                                            # 980, 960, ..., 0
  rng = np.random.default_rng(6)
  for t in [980, 500, 20, 0]:
    x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = rng.normal(size=x.shape).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    out = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta, use_clipped_model_output=clip is not None,
                   variance_noise=torch.from_numpy(noise) if eta > 0 else None).prev_sample.numpy()
    abar_prev = sched.alphas_cumprod[t - 20] if t > 0 else jnp.float32(1.0)
    got = dif.ddim_step(jnp.asarray(x), jnp.asarray(eps), sched.alphas_cumprod[t], abar_prev, jnp.asarray(noise),
                        eta=eta, clip_x0=clip)
    np.testing.assert_allclose(np.asarray(got), out, atol=2e-4, rtol=1e-4, err_msg=f"t={t}")


def test_ddim_sampler_matches_diffusers_loop():
  """Deterministic DDIM (eta=0) from the same x_T with the same analytic model: whole trajectories agree."""
  sched = dif.make_schedule(dif.DiffusionConfig())
  eps_fn = mixture_eps_fn(**MIXTURE)
  x_T = np.random.default_rng(7).normal(size=(256, 1)).astype(np.float32)
  got = dif.ddim_sample(eps_fn, sched, jax.random.key(0), x_T.shape, timesteps=np.arange(0, T, 20),
                        x_T=jnp.asarray(x_T))
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True,
                                clip_sample=False, timestep_spacing="leading", steps_offset=0)
  ref.set_timesteps(50)
  x = torch.from_numpy(x_T)
  for t in ref.timesteps:
    e = eps_fn(jnp.asarray(x.numpy()), jnp.full((x.shape[0],), int(t), jnp.int32))
    x = ref.step(torch.from_numpy(np.array(e)), t, x, eta=0.0).prev_sample
  np.testing.assert_allclose(np.asarray(got), x.numpy(), atol=1e-4)
  assert np.std(x.numpy()) > 0.5                                   # samples spread over both modes


# ---- samplers on data with a known optimal model -----------------------------------------------------------


def point_eps_fn(x_star):
  """Data = the single point x*: eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
  abar_table = jnp.asarray(REF_ABAR, jnp.float32)

  def eps_fn(x, t):
    a = abar_table[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
  return eps_fn


def test_samplers_recover_a_single_point_under_jit():
  sched = dif.make_schedule(dif.DiffusionConfig())
  x_star = jnp.asarray(np.random.default_rng(8).normal(size=(4, 4, 3)), jnp.float32)   # [H, W, C]
  eps_fn = point_eps_fn(x_star)
  shape = (8, 4, 4, 3)
  ddpm = jax.jit(lambda r: dif.ddpm_sample(eps_fn, sched, r, shape, num_steps=250))(jax.random.key(1))
  ddim = jax.jit(lambda r: dif.ddim_sample(eps_fn, sched, r, shape, num_steps=50))(jax.random.key(2))
  for out in (ddpm, ddim):
    assert out.shape == shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - x_star))) < 1e-3


def test_samplers_match_gaussian_data_moments():
  """x0 ~ N(mu, s^2): eps*(x_t) = sqrt(1-abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
  mu, s, n = 1.5, 0.5, 20_000
  sched = dif.make_schedule(dif.DiffusionConfig())
  eps_fn = mixture_eps_fn(w=[1.0], mu=[mu], s=[s])
  # 4-sigma statistical error + the samplers' own discretization bias (with the exact model the finite chains
  # under-disperse slightly: std about 1-3% of s low for these step counts; a wrong step formula is caught
  # exactly by the diffusers step tests above).
  tol_mean = 4 * s / math.sqrt(n) + 0.01
  tol_std = 4 * s / math.sqrt(2 * n) + 0.02
  for name, out in [("ddpm250", dif.ddpm_sample(eps_fn, sched, jax.random.key(3), (n, 1), num_steps=250)),
                    ("ddim50", dif.ddim_sample(eps_fn, sched, jax.random.key(4), (n, 1), num_steps=50))]:
    x = np.asarray(out)[:, 0]
    assert abs(x.mean() - mu) < tol_mean, (name, x.mean())
    assert abs(x.std() - s) < tol_std, (name, x.std())


def test_ddim_eta1_full_chain_matches_ddpm_in_distribution():
  """DDIM with eta=1 over all 1000 steps is the DDPM ancestral sampler; both sample the true mixture."""
  sched = dif.make_schedule(dif.DiffusionConfig())
  eps_fn = mixture_eps_fn(**MIXTURE)
  n = 4000
  ddpm = np.asarray(dif.ddpm_sample(eps_fn, sched, jax.random.key(10), (n, 1), num_steps=1000))[:, 0]
  ddim = np.asarray(dif.ddim_sample(eps_fn, sched, jax.random.key(11), (n, 1), num_steps=1000, eta=1.0))[:, 0]
  assert scipy.stats.ks_2samp(ddpm, ddim).pvalue > 0.01
  for x in (ddpm, ddim):
    assert scipy.stats.kstest(x, lambda v: mixture_cdf(v, **MIXTURE)).pvalue > 0.01
    np.testing.assert_allclose(np.mean(x < -0.5), MIXTURE["w"][0], atol=4 * math.sqrt(0.21 / n))
  np.testing.assert_allclose(np.quantile(ddpm, [0.1, 0.5, 0.9]), np.quantile(ddim, [0.1, 0.5, 0.9]), atol=0.1)


def test_ddpm_250_samples_the_mixture():
  sched = dif.make_schedule(dif.DiffusionConfig())
  x = np.asarray(dif.ddpm_sample(mixture_eps_fn(**MIXTURE), sched, jax.random.key(12), (4000, 1)))[:, 0]
  assert scipy.stats.kstest(x, lambda v: mixture_cdf(v, **MIXTURE)).pvalue > 0.01


def test_clip_x0_bounds_the_result():
  sched = dif.make_schedule(dif.DiffusionConfig())
  eps_fn = point_eps_fn(jnp.full((2, 2, 1), 3.0))                 # data outside [-1, 1]
  out = dif.ddpm_sample(eps_fn, sched, jax.random.key(0), (4, 2, 2, 1), num_steps=20, clip_x0=1.0)
  assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
  out = dif.ddim_sample(eps_fn, sched, jax.random.key(0), (4, 2, 2, 1), num_steps=20, clip_x0=1.0)
  assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6


# ---- guidance -----------------------------------------------------------------------------------------------


def test_cfg_combine_formula():
  rng = np.random.default_rng(9)
  c, u = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
  for w in (0.0, 1.0, 1.55, 3.0):
    np.testing.assert_allclose(np.asarray(dif.cfg_combine(jnp.asarray(c), jnp.asarray(u), w)), u + w * (c - u),
                               rtol=1e-6, atol=1e-12)


def test_guided_eps_fn_uses_one_batch_of_2n_rows():
  calls = []
  n = 3

  def eps_batch_fn(x, t):                                          # cond rows -> 2x + t, uncond rows -> -x
    calls.append((x.shape, t.shape))
    is_cond = (jnp.arange(x.shape[0]) < x.shape[0] // 2)[:, None, None, None]
    return jnp.where(is_cond, 2 * x + t[:, None, None, None], -x)

  x = jnp.asarray(np.random.default_rng(10).normal(size=(n, 2, 2, 1)), jnp.float32)
  t = jnp.array([5, 6, 7], jnp.int32)
  scale = 1.55
  got = jax.jit(dif.guided_eps_fn(eps_batch_fn, scale))(x, t)
  assert calls == [((2 * n, 2, 2, 1), (2 * n,))]
  cond, uncond = 2 * np.asarray(x) + np.asarray(t)[:, None, None, None], -np.asarray(x)
  np.testing.assert_allclose(np.asarray(got), uncond + scale * (cond - uncond), rtol=1e-6)

  # used inside a sampler, the model still sees 2N rows per step
  calls.clear()
  sched = dif.make_schedule(dif.DiffusionConfig())
  out = dif.ddim_sample(dif.guided_eps_fn(eps_batch_fn, scale), sched, jax.random.key(0), (n, 2, 2, 1), num_steps=4)
  assert out.shape == (n, 2, 2, 1) and calls and all(c[0][0] == 2 * n for c in calls)


# ---- configuration errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [(dict(schedule="sigmoid"), "schedule"), (dict(prediction="v"), "prediction"),
                                      (dict(image_first_max_t=1000), "image_first_max_t"),
                                      (dict(num_timesteps=0), "num_timesteps")])
def test_config_rejects_bad_values(kw, field):
  with pytest.raises(ValueError, match=f"diffusion.{field}"):
    dif.DiffusionConfig(**kw)


def test_bad_sampling_steps_are_rejected():
  sched = dif.make_schedule(dif.DiffusionConfig())
  with pytest.raises(ValueError, match="num_steps"):
    dif.sampling_timesteps(T, 1001)
  with pytest.raises(ValueError, match="strictly increasing"):
    dif.ddpm_sample(point_eps_fn(0.0), sched, jax.random.key(0), (1, 1), timesteps=[0, 500, 400])
  with pytest.raises(ValueError, match="strictly increasing"):
    dif.ddim_sample(point_eps_fn(0.0), sched, jax.random.key(0), (1, 1), timesteps=[0, 1000])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_snr_shift_divides_the_signal_to_noise_ratio(schedule):
  """snr_shift = s: SNR'_t = SNR_t / s^2 at every t (numpy float64 from the unshifted betas), the betas and
  alphas are those of the new abar, and s = 1 leaves the schedule bit for bit."""
  base = dif.make_schedule(dif.DiffusionConfig(schedule=schedule))
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(base, dif.make_schedule(dif.DiffusionConfig(schedule=schedule, snr_shift=1.0))))
  betas = (dif.cosine_betas(1000) if schedule == "cosine" else dif.linear_betas(1000))
  abar = np.cumprod(1.0 - betas)
  for s in (0.5, 4.0):
    sh = dif.make_schedule(dif.DiffusionConfig(schedule=schedule, snr_shift=s))
    got = np.asarray(sh.alphas_cumprod, np.float64)
    want = (abar / (1 - abar) / s ** 2) / (1 + abar / (1 - abar) / s ** 2)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(np.cumprod(np.asarray(sh.alphas, np.float64)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sh.betas), 1 - np.asarray(sh.alphas), atol=1e-7)
    assert np.all(np.diff(got) < 0)
  for bad in (0, -1.0, float("nan"), "2"):
    with pytest.raises(UserError, match="snr_shift"):
      dif.DiffusionConfig(snr_shift=bad)
