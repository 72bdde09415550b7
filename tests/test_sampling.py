"""Image generation (issue 6): cached-prefix sampling equals recomputing the prefix, the model's eps is wired
through the samplers and classifier-free guidance correctly (an analytic-eps model recovers its points),
rows of different prompt lengths are independent of their batch, and images/PNGs/contact sheets/CLI."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lmfusion_jax import cli, diffusion
from lmfusion_jax.inference import image as gi, image_files
from lmfusion_jax.inference import loading as model_loading
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.models.config import FusionConfig, LlamaConfig
from lmfusion_jax.models import sharded
from lmfusion_jax.models.fusion import LMFusion

DCFG = diffusion.DiffusionConfig()
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]   # different lengths: left padding in one cache


def _random_leaf(path, shape, rng) -> np.ndarray:
  """Norm scales ~ 1 + 0.1 N, biases ~ 0.1 N, weights ~ N / sqrt(fan_in) (per layer for stacked weights)."""
  name = str(path[-1].key)
  if "norm" in name or name == "scale":
    return 1.0 + 0.1 * rng.standard_normal(shape)
  if name == "bias":
    return 0.1 * rng.standard_normal(shape)
  stacked = any(getattr(p, "key", None) == "layers" for p in path)
  return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]) / (shape[0] if stacked else 1))


def tiny_model(image_io="linear", vocab=64, bos=1, eos=2, boi=3, eoi=4, seed=0) -> LMFusion:
  """A tiny LMFusion with every parameter random (also the zero-initialized eps output layer and biases, so
  the predicted noise depends on everything). Drawn with numpy: no per-shape compilations."""
  lcfg = LlamaConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
                     rope_theta=10000.0, max_seq_len=256, bos_id=bos, eos_id=eos)
  fcfg = FusionConfig(image_io=image_io, latent_size=8, latent_channels=1, patch_size=2, unet_channels=(16, 32),
                      unet_blocks=1, unet_groups=8, time_embed_dim=32, boi_id=boi, eoi_id=eoi)
  graphdef, abstract = sharded.graphdef_and_abstract_state(lcfg, fcfg)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(_random_leaf(p, s.shape, rng), s.dtype), nnx.to_pure_dict(abstract))
  return sharded.merge(graphdef, abstract, params)


class AnalyticEps(nnx.Module):
  """Runs the real model (so the prefix cache is built and used as usual) and returns

    eps = (x_t - sqrt(abar_t) X) / sqrt(1 - abar_t)  +  mix * sqrt(abar_t / (1 - abar_t)) * eps_model,

  i.e. (mix = 0) the exact noise prediction for data concentrated on one point X per row; with mix > 0 the
  predicted x0 is X - mix * eps_model(x_t, t): the real model's output (which sees the prompt only through
  attention to the prefix) moves every step by a bounded amount, at every noise level.

  X depends on the row's prompt through the image position the sampler passes (= prefix length):
  unconditional rows (`BOS BOI`, image at position 2) have X = U, conditional rows X = position / 10 * C.
  """

  def __init__(self, inner: LMFusion, cond_pattern, uncond_pattern, mix: float):
    self.inner, self.text, self.lcfg, self.fcfg = inner, inner.text, inner.lcfg, inner.fcfg
    self.abar = nnx.Variable(diffusion.make_schedule(DCFG).alphas_cumprod)
    self.cond, self.uncond = nnx.Variable(jnp.asarray(cond_pattern)), nnx.Variable(jnp.asarray(uncond_pattern))
    self.mix = nnx.Variable(jnp.float32(mix))

  def __call__(self, text, image=None, cache=None):
    logits, eps_model, kv = self.inner(text, image, cache=cache)
    if image is None:
      return logits, eps_model, kv
    noisy_latents, timesteps = image.latents, image.timesteps
    pos = image.positions[:, :, None, None, None].astype(jnp.float32)
    target = jnp.where(pos == 2, self.uncond[...], pos / 10.0 * self.cond[...])
    abar = self.abar[...][timesteps][:, :, None, None, None]
    eps = (noisy_latents - jnp.sqrt(abar) * target) / jnp.sqrt(1.0 - abar)
    return logits, eps + self.mix[...] * jnp.sqrt(abar / (1.0 - abar)) * eps_model, kv


PATTERNS = (np.random.default_rng(0).uniform(-1, 1, (8, 8, 1)).astype(np.float32),
            np.random.default_rng(1).uniform(-1, 1, (8, 8, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def mixed(model):
  return AnalyticEps(model, *PATTERNS, mix=0.5)


COMBOS = [("ddpm", 1.0), ("ddpm", 2.5), ("ddim", 1.0), ("ddim", 2.5)]
KW = dict(num_steps=4, seed=3)


@pytest.mark.parametrize("sampler,cfg_scale", COMBOS)
def test_cached_prefix_sampling_equals_recomputed_prefix(mixed, sampler, cfg_scale):
  kw = dict(sampler=sampler, cfg_scale=cfg_scale, **KW)
  cached = np.asarray(gi.generate_images(mixed, PROMPTS, DCFG, use_cache=True, **kw))
  recomputed = np.asarray(gi.generate_images(mixed, PROMPTS, DCFG, use_cache=False, **kw))
  assert cached.shape == (3, 8, 8, 1) and np.all(np.isfinite(cached))
  assert np.max(np.abs(cached - recomputed)) <= 1e-5
  # the model's own (prompt-dependent) output matters: this is not the analytic sampler alone
  exact = np.asarray(gi.generate_images(AnalyticEps(mixed.inner, *PATTERNS, mix=0.0), PROMPTS, DCFG, **kw))
  assert np.max(np.abs(exact - cached)) > 1e-2


def test_rows_do_not_depend_on_the_batch(mixed):
  """A prompt padded inside a batch of longer prompts samples exactly what it samples alone."""
  kw = dict(sampler="ddpm", cfg_scale=2.5, **KW)
  batch = np.asarray(gi.generate_images(mixed, PROMPTS, DCFG, **kw))
  alone = np.asarray(gi.generate_images(mixed, PROMPTS[:1], DCFG, **kw))
  np.testing.assert_allclose(batch[:1], alone, atol=1e-5)
  other = np.asarray(gi.generate_images(mixed, [[20, 21, 22]], DCFG, **kw))  # same noise and length, other words
  assert np.max(np.abs(other - alone)) > 1e-3


@pytest.mark.parametrize("sampler,cfg_scale", COMBOS)
def test_analytic_eps_model_recovers_its_point(model, sampler, cfg_scale):
  cond, uncond = PATTERNS
  wrapped = AnalyticEps(model, cond, uncond, mix=0.0)
  out = np.asarray(gi.generate_images(wrapped, PROMPTS, DCFG, sampler=sampler, cfg_scale=cfg_scale, **KW))
  for row, prompt in enumerate(PROMPTS):
    x_cond = (len(prompt) + 2) / 10.0 * cond            # image position = len(BOS prompt BOI)
    want = uncond + cfg_scale * (x_cond - uncond)       # guided eps is the exact eps of this point
    np.testing.assert_allclose(out[row], want, atol=2e-4, rtol=1e-4)


def test_bad_arguments_are_rejected(model):
  with pytest.raises(ValueError, match="sampler"):
    gi.generate_images(model, PROMPTS, DCFG, num_steps=2, sampler="euler")
  with pytest.raises(ValueError, match="num_steps"):
    gi.generate_images(model, PROMPTS, DCFG, num_steps=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    gi.generate_images(model, [[5] * 300], DCFG, num_steps=2)


def test_decode_to_images_png_and_contact_sheet(tmp_path):
  lat = np.zeros((3, 2, 2, 1), np.float32)
  lat[0] = -1.0
  lat[1] = 1.0
  lat[2] = [[[-2.0], [0.0]], [[0.5], [3.0]]]        # clipped outside [-1, 1]
  img = image_files.decode_to_images(lat)
  assert img.dtype == np.uint8 and img.shape == (3, 2, 2, 1)
  assert img[0].max() == 0 and img[1].min() == 255
  assert img[2, :, :, 0].tolist() == [[0, 128], [191, 255]]   # round((x + 1) * 127.5)
  sheet = image_files.contact_sheet(img, columns=2, pad=1, pad_value=7)
  assert sheet.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
  np.testing.assert_array_equal(sheet[1:3, 4:6], img[1])       # row 0, column 1
  np.testing.assert_array_equal(sheet[4:6, 1:3], img[2])       # row 1, column 0
  assert sheet[0, 0, 0] == 7 and np.all(sheet[4:6, 4:6] == 7)  # padding and the empty cell
  out = image_files.write_samples(img, tmp_path / "s", scale=3, columns=2)
  assert len(out["images"]) == 3 and not [f for f in os.listdir(tmp_path / "s") if f.startswith(".tmp")]
  back = np.asarray(Image.open(out["images"][2]))
  np.testing.assert_array_equal(back, np.repeat(np.repeat(img[2, :, :, 0], 3, 0), 3, 1))
  assert np.asarray(Image.open(out["contact_sheet"])).shape == (2 * 8 + 2, 2 * 8 + 2)


def test_sample_cli_writes_pngs_matching_the_library(tmp_path, tokenizer_dir):
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  tok = load_tokenizer(tokenizer_dir)
  sp = special_ids(tok)
  m = tiny_model(image_io="unet", vocab=512, bos=sp["bos"], eos=sp["eos"], boi=sp["boi"], eoi=sp["eoi"])
  params_io.save_params(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(m)), m.lcfg, m.fcfg)
  out = tmp_path / "samples"
  rc = cli.main(["sample", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", tokenizer_dir,
                 "--prompt", "a handwritten digit seven", "--prompt", "digit 3", "--num", "2", "--steps", "3",
                 "--cfg", "2", "--seed", "5", "--out", str(out)])
  assert rc == 0
  files = sorted(f for f in os.listdir(out) if f.startswith("sample_"))
  assert len(files) == 4 and os.path.exists(out / "contact_sheet.png")
  manifest = json.loads((out / "prompts.json").read_text())
  assert [e["prompt"] for e in manifest] == ["a handwritten digit seven"] * 2 + ["digit 3"] * 2
  loaded = model_loading.load_model(tmp_path / "ckpt")          # what the CLI restored (8 fake devices)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(m))), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  restored = sharded.model(loaded.llama, loaded.fusion, loaded.params)
  enc = CaptionEncoder(tok)
  want = image_files.decode_to_images(gi.generate_images(
      restored, [enc(e["prompt"]) for e in manifest], DCFG, num_steps=3, cfg_scale=2.0, seed=5, clip_x0=1.0,
      pad_id=sp["pad"]))
  for k, f in enumerate(files):
    png = np.asarray(Image.open(out / f))
    assert png.shape == (64, 64)                        # 8x8 upscaled to >= 64 pixels
    np.testing.assert_array_equal(png[::8, ::8], want[k, :, :, 0])
