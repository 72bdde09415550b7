"""Flax AutoencoderKL vs diffusers' torch AutoencoderKL on tiny random models, the converter's error
paths, and the Flax VAE checkpoint round trip."""
import argparse
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from lmfusion_jax.checkpoints import vae as vae_ckpt
from lmfusion_jax.checkpoints.files import CheckpointError, OutputExistsError
from lmfusion_jax.convert import diffusers_vae as cv
from lmfusion_jax.models import vae as V
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.sharding import logical_to_spec

TOL = 1e-4


def make_torch_vae(seed=0, **kw):
  """A tiny random diffusers AutoencoderKL with randomized GroupNorm affine parameters."""
  torch.manual_seed(seed)
  n = len(kw.get("block_out_channels", (32, 64)))
  args = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
              sample_size=32, down_block_types=("DownEncoderBlock2D",) * n,
              up_block_types=("UpDecoderBlock2D",) * n)
  args.update(kw)
  model = TorchAutoencoderKL(**args).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # GroupNorms start at weight 1 / bias 0: make them matter
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.5 * torch.randn_like(p))
  return model


def save_torch_vae(model, folder):
  model.save_pretrained(str(folder), safe_serialization=True)
  return folder


def to_nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def torch_reference(model, images_nhwc, latents_nhwc):
  """diffusers' posterior mean/logvar of the images and decoded raw latents, NCHW numpy."""
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(to_nchw(images_nhwc).copy())).latent_dist
    dec = model.decode(torch.from_numpy(to_nchw(latents_nhwc).copy())).sample
  return dist.mean.numpy(), dist.logvar.numpy(), dec.numpy()


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
  model = make_torch_vae()
  folder = save_torch_vae(model, tmp_path_factory.mktemp("sd_vae"))
  cfg, vae = cv.load_diffusers_vae(folder)
  return model, folder, cfg, vae


def random_inputs(cfg, batch=2, size=32, seed=0):
  rs = np.random.RandomState(seed)
  images = rs.uniform(-1, 1, (batch, size, size, cfg.in_channels)).astype(np.float32)
  f = cfg.downsample_factor
  latents = rs.randn(batch, size // f, size // f, cfg.latent_channels).astype(np.float32)
  return images, latents


def test_standard_layout_matches_diffusers(standard):
  model, _, cfg, vae = standard
  assert cfg.scaling_factor == pytest.approx(model.config.scaling_factor) == pytest.approx(0.18215)
  assert cfg.shift_factor is None and cfg.block_out_channels == (32, 64)
  images, latents = random_inputs(cfg)
  ref_mean, ref_logvar, ref_dec = torch_reference(model, images, latents)
  mean, logvar = V.encode(vae, images)
  assert mean.shape == (2, 16, 16, 4)
  assert max_diff(to_nchw(mean), ref_mean) <= TOL
  assert max_diff(to_nchw(logvar), ref_logvar) <= TOL
  decoded = V.decode(vae, latents)
  assert decoded.shape == (2, 32, 32, 3)
  assert np.abs(ref_dec).max() > 0.1  # the comparison is not between two near-zero tensors
  assert max_diff(to_nchw(decoded), ref_dec) <= TOL
  # Scaled latents: (mean - 0) * 0.18215, and decode_latents inverts the scaling before decoding.
  scaled = V.encode_latents(vae, images)
  assert max_diff(to_nchw(scaled), ref_mean * 0.18215) <= TOL
  with torch.no_grad():
    ref_dec_scaled = model.decode(torch.from_numpy(to_nchw(latents) / 0.18215)).sample.numpy()
  assert max_diff(to_nchw(V.decode_latents(vae, latents)), ref_dec_scaled) <= TOL * 10  # outputs ~5x larger


def test_sampled_latents_and_jitted_functions(standard):
  _, _, cfg, vae = standard
  images, latents = random_inputs(cfg, batch=1, seed=3)
  rng = jax.random.key(7)
  mean, logvar = V.encode(vae, images)
  sample = V.encode_latents(vae, images, rng)
  noise = (np.asarray(sample) / cfg.scaling_factor - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  np.testing.assert_allclose(noise, np.asarray(jax.random.normal(rng, mean.shape)), atol=1e-3)
  enc = V.jit_encode_latents(vae)
  dec = V.jit_decode_latents(vae)
  np.testing.assert_allclose(enc(images), V.encode_latents(vae, images), atol=1e-5)
  np.testing.assert_allclose(enc(images, rng), sample, atol=1e-5)
  np.testing.assert_allclose(dec(latents), V.decode_latents(vae, latents), atol=1e-5)


def test_variant_layout_without_quant_convs(tmp_path):
  """Three levels, 2 resnets/level, no quant convs, no mid attention, shift_factor (SD3/Flux-like)."""
  model = make_torch_vae(seed=1, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4,
                         latent_channels=6, use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159)
  cfg, vae = cv.load_diffusers_vae(save_torch_vae(model, tmp_path / "vae"))
  assert (cfg.scaling_factor, cfg.shift_factor) == (pytest.approx(0.3611), pytest.approx(0.1159))
  assert vae.quant_conv is None and vae.post_quant_conv is None and cfg.downsample_factor == 4
  images, latents = random_inputs(cfg, batch=1, size=16, seed=2)
  ref_mean, _, _ = torch_reference(model, images, latents)
  assert max_diff(to_nchw(V.encode_latents(vae, images)), (ref_mean - 0.1159) * 0.3611) <= TOL
  with torch.no_grad():
    raw = torch.from_numpy(to_nchw(latents) / 0.3611 + 0.1159)
    ref_dec = model.decode(raw).sample.numpy()
  assert max_diff(to_nchw(V.decode_latents(vae, latents)), ref_dec) <= TOL


def test_every_param_has_logical_names(standard):
  _, _, _, vae = standard
  for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.value.ndim, path
    logical_to_spec(names)  # raises KeyError for a name missing from LOGICAL_RULES


def rewrite_weights(src, dst, edit):
  shutil.copytree(src, dst)
  path = dst / cv.DIFFUSERS_WEIGHTS
  tensors = safetensors.numpy.load_file(str(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path))
  return dst


def run_cli(argv):
  """The real `lmfusion-jax` entry point: (exit code, stderr)."""
  import contextlib
  import io
  from lmfusion_jax.cli import main
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = main(argv)
  return rc, err.getvalue()


def assert_cli_fails_cleanly(folder, out, *needles):
  rc, message = run_cli(["convert-vae", "--diffusers-dir", str(folder), "--out", str(out)])
  assert rc not in (0, None)
  for needle in needles:
    assert needle in message, message
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


def test_missing_tensor(standard, tmp_path):
  _, folder, _, _ = standard
  key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
  bad = rewrite_weights(folder, tmp_path / "bad", lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
    cv.load_diffusers_vae(bad)
  assert_cli_fails_cleanly(bad, tmp_path / "out", key, cv.DIFFUSERS_WEIGHTS)


def test_wrong_shape(standard, tmp_path):
  _, folder, _, _ = standard
  key = "encoder.mid_block.attentions.0.to_k.weight"
  bad = rewrite_weights(folder, tmp_path / "bad",
                        lambda t: t.__setitem__(key, np.zeros((64, 32), np.float32)))
  assert_cli_fails_cleanly(bad, tmp_path / "out", key, "(64, 32)", "(64, 64)", cv.DIFFUSERS_WEIGHTS)


def test_unused_tensor_is_an_error(standard, tmp_path):
  _, folder, _, _ = standard
  bad = rewrite_weights(folder, tmp_path / "bad",
                        lambda t: t.__setitem__("encoder.extra.weight", np.zeros((3,), np.float32)))
  with pytest.raises(CheckpointError, match="encoder.extra.weight"):
    cv.load_diffusers_vae(bad)


def test_no_safetensors(standard, tmp_path):
  _, folder, _, _ = standard
  bad = tmp_path / "bin_only"
  bad.mkdir()
  shutil.copy(folder / "config.json", bad / "config.json")
  (bad / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  assert_cli_fails_cleanly(bad, tmp_path / "out", str(bad), cv.DIFFUSERS_WEIGHTS, "safetensors")


def test_unsupported_config_field(standard, tmp_path):
  _, folder, _, _ = standard
  bad = tmp_path / "attn_blocks"
  shutil.copytree(folder, bad)
  d = json.loads((bad / "config.json").read_text())
  d["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  (bad / "config.json").write_text(json.dumps(d))
  with pytest.raises(ConfigError, match="down_block_types"):
    cv.load_diffusers_vae(bad)
  assert_cli_fails_cleanly(bad, tmp_path / "out", "down_block_types", str(bad / "config.json"))


def test_legacy_attention_names_load(standard, tmp_path):
  _, folder, _, vae = standard
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def to_legacy(t):
    for k in [k for k in t if ".attentions.0." in k]:
      for new, old in renames.items():
        if f".{new}." in k:
          t[k.replace(f".{new}.", f".{old}.")] = t.pop(k)
  _, legacy = cv.load_diffusers_vae(rewrite_weights(folder, tmp_path / "legacy", to_legacy))
  for a, b in zip(jax.tree.leaves(nnx.state(vae)), jax.tree.leaves(nnx.state(legacy))):
    np.testing.assert_array_equal(a, b)


def test_flax_checkpoint_round_trip_is_bitwise(standard, tmp_path):
  _, folder, cfg, vae = standard
  out = tmp_path / "flax_vae"
  assert run_cli(["convert-vae", "--diffusers-dir", str(folder), "--out", str(out)])[0] == 0
  cfg2, vae2 = vae_ckpt.load_vae(out)
  assert cfg2 == cfg
  flat1 = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
  flat2 = dict(nnx.to_flat_state(nnx.state(vae2, nnx.Param)))
  assert flat1.keys() == flat2.keys()
  for k in flat1:
    a, b = np.asarray(flat1[k].value), np.asarray(flat2[k].value)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k
    assert flat1[k].get_metadata().get("out_sharding") == flat2[k].get_metadata().get("out_sharding")
  # An existing output is not overwritten silently; a failed write leaves the old folder intact.
  with pytest.raises(OutputExistsError):
    vae_ckpt.save_vae(vae, cfg, out)
  rc, message = run_cli(["convert-vae", "--diffusers-dir", str(folder), "--out", str(out)])
  assert rc != 0 and "exists" in message, message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["flax_vae"]
  vae_ckpt.save_vae(vae2, cfg2, out, overwrite=True)  # explicit overwrite replaces it, leaving no temp folders
  assert sorted(p.name for p in tmp_path.iterdir()) == ["flax_vae"]
  assert vae_ckpt.load_vae(out)[0] == cfg


def test_failed_save_leaves_nothing(standard, tmp_path, monkeypatch):
  _, _, cfg, vae = standard

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(vae_ckpt.safetensors.flax, "save", boom)
  with pytest.raises(OSError, match="disk full"):
    vae_ckpt.save_vae(vae, cfg, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_help_text_mentions_inputs():
  from lmfusion_jax.commands import convert_vae
  p = argparse.ArgumentParser(prog="lmfusion-jax convert-vae")
  convert_vae.add_arguments(p)
  text = p.format_help()
  assert "--diffusers-dir" in text and "--out" in text and "safetensors" in text
