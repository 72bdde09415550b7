"""Online encoding (`--config.data.encode=online`): the same images prepared both ways (`prepare-data --vae-dir`
and `--encode none`) give the same batches, latents and train step; a png dataset trains end to end on 8
devices; crops / flips; the config errors; `plan` reports the encoder's share."""
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from lmfusion_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 16   # pixels; the test VAE halves them: latents [8, 8, 4], the tiny config's latent size
N_IMAGES = 12
# Precomputed latents come from prepare-data's jit (8 images per call, one per device); online ones from the
# train step's (16 per call, 2 per device, another XLA program). Same inputs bitwise, same function; the CPU
# convolutions may still round differently per program, so latents and losses are compared within a few float32
# ulps of their scale (the tiny VAE's latents are O(0.1); the loss O(1..10)).
LATENT_ATOL = 1e-6
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_vae):
  """One folder of images + captions prepared twice into one data dir: res16 (latents), png16 (images)."""
  from lmfusion_jax.data.prepare import prepare_data
  root = tmp_path_factory.mktemp("online")
  src = root / "src"
  src.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for k in range(N_IMAGES):
    w, h = int(rng.integers(SIZE, 2 * SIZE)), int(rng.integers(SIZE, 2 * SIZE))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"{k}.png")
    lines.append(json.dumps({"file": f"{k}.png", "caption": f"a picture number {k}"}))
  (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
  out = root / "tfds"
  a = prepare_data(str(src), "folder", str(out), SIZE, vae_dir=tiny_vae[0], batch_size=4)
  b = prepare_data(str(src), "folder", str(out), SIZE, encode="none", batch_size=4)
  assert a["written"] == b["written"] == N_IMAGES and (a["config_name"], b["config_name"]) == ("res16", "png16")
  return str(out)


def tiny_cfg(tokenizer_dir, data_dir, workdir, *overrides):
  from lmfusion_jax.run_config import apply_overrides, load_config
  return apply_overrides(load_config("configs/tiny.py"), [
      f"--config.workdir={workdir}", "--config.data.dataset=image_captions", f"--config.data.data_dir={data_dir}",
      f"--config.data.image_size={SIZE}", f"--config.data.tokenizer_dir={tokenizer_dir}",
      "--config.fusion.latent_channels=4", "--config.fusion.image_io=linear", "--config.model.n_layers=1",
      "--config.tensorboard=false", "--config.total_steps=2", "--config.log_every=1", "--config.save_every=2",
      *overrides])


def first_batch(cfg, tokenizer_dir):
  from lmfusion_jax.data.pipeline import make_train_iterator
  from lmfusion_jax.data.tokenizer import load_tokenizer
  return next(make_train_iterator(cfg.data, load_tokenizer(tokenizer_dir), process_index=0, process_count=1))


def test_same_images_same_loss_both_ways(datasets, tiny_vae, tokenizer_dir, tmp_path):
  """The batches agree field for field (pixels -> latents aside); the step's online latents equal the
  precomputed ones, and one train step from the same state (same noise and timesteps: the step's rng) gives
  the same metrics and updated parameters, within the tolerances above."""
  from lmfusion_jax import sharding
  from lmfusion_jax.data.batch import global_batch
  from lmfusion_jax.models import sharded
  from lmfusion_jax.run_config import model_configs
  from lmfusion_jax.training import online_encoding, optimizer as optim, step as ts
  from lmfusion_jax.training.loop import resolve_special_ids
  from lmfusion_jax.data.tokenizer import load_tokenizer
  pre = tiny_cfg(tokenizer_dir, datasets, tmp_path / "a")
  onl = tiny_cfg(tokenizer_dir, datasets, tmp_path / "b", "--config.data.encode=online",
                 f"--config.data.vae_dir={tiny_vae[0]}")
  hb_pre, hb_onl = first_batch(pre, tokenizer_dir), first_batch(onl, tokenizer_dir)
  assert hb_onl["pixels"].dtype == np.uint8 and hb_onl["pixels"].shape == (8, 2, SIZE, SIZE, 3)
  assert set(hb_pre) - {"latents"} == set(hb_onl) - {"pixels"}
  for k in set(hb_pre) - {"latents"}:
    np.testing.assert_array_equal(hb_pre[k], hb_onl[k], err_msg=k)

  lcfg, fcfg, dcfg = model_configs(pre)
  lcfg, fcfg = resolve_special_ids(pre, lcfg, fcfg, load_tokenizer(tokenizer_dir))
  mesh = sharding.mesh_from_config(pre.mesh)
  enc, enc_params = online_encoding.load(onl.data, mesh)
  tx = optim.make_optimizer(pre.optim, pre.total_steps)
  _, params = sharded.init_sharded(lcfg, fcfg, mesh, seed=0)
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(pre.optim))
  spec_onl = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(pre.optim), online=enc)
  b_pre, b_onl = global_batch(hb_pre, mesh), global_batch(hb_onl, mesh)

  with jax.set_mesh(mesh):
    latents = jax.jit(lambda p, b: online_encoding.encode_pixels(enc, p, b["pixels"], b["image_segment_ids"] > 0)
                      )(enc_params, b_onl)
  latent_diff = float(np.abs(np.asarray(latents) - hb_pre["latents"]).max())
  assert latent_diff <= LATENT_ATOL, latent_diff
  assert np.all(np.asarray(latents)[hb_pre["image_segment_ids"] == 0] == 0)   # empty slots: zeros, as padded

  results = []
  for sp, batch, extra in ((spec, b_pre, ()), (spec_onl, b_onl, (enc_params,))):
    state = ts.new_state(sp, tx, jax.tree.map(lambda x: x.copy(), params), 0, mesh)
    step = ts.jit_train_step(sp, tx, mesh, batch)
    with jax.set_mesh(mesh):
      new, metrics = step(state, batch, *extra)
    results.append((jax.device_get(metrics), jax.device_get(new["params"]["image"])))
  (m_pre, p_pre), (m_onl, p_onl) = results
  for k in ("loss", "text_loss", "image_loss"):
    assert abs(float(m_onl[k]) - float(m_pre[k])) <= LOSS_RTOL * abs(float(m_pre[k])), (k, m_pre[k], m_onl[k])
  param_diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_pre), jax.tree.leaves(p_onl)))
  assert param_diff <= 1e-5, param_diff
  print(f"online vs precomputed: latents max |diff| {latent_diff:.3g}, "
        + ", ".join(f"{k} {float(m_pre[k])!r} vs {float(m_onl[k])!r}" for k in ("loss", "text_loss", "image_loss"))
        + f", updated image params max |diff| {param_diff:.3g}")


def test_png_dataset_trains_online(datasets, tiny_vae, tokenizer_dir, tmp_path):
  """`train --config.data.encode=online` on the png dataset (8 devices: fsdp 4 x tensor 2), with flips."""
  from lmfusion_jax import cli
  code = cli.main(["train", "--config", str(REPO / "configs" / "tiny.py"), f"--config.workdir={tmp_path / 'run'}",
                   "--config.data.dataset=image_captions", f"--config.data.data_dir={datasets}",
                   f"--config.data.image_size={SIZE}", f"--config.data.tokenizer_dir={tokenizer_dir}",
                   "--config.data.encode=online", f"--config.data.vae_dir={tiny_vae[0]}", "--config.data.random_flip=true",
                   "--config.fusion.latent_channels=4", "--config.fusion.image_io=linear", "--config.model.n_layers=1",
                   "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.total_steps=2",
                   "--config.log_every=1", "--config.save_every=2", "--config.tensorboard=false"])
  assert code == 0
  steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) for s in steps)
  ckpt = tmp_path / "run" / "checkpoints" / "2"
  assert ckpt.exists() and "encoder" not in json.dumps(sorted(p.name for p in ckpt.rglob("*")))
  assert json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]["data"]["vae_dir"] == tiny_vae[0]


def test_crop_and_flip(tiny_vae):
  """A crop is a window of the image, a flip its mirror; crops shrink the latents by the VAE's factor."""
  import jax.numpy as jnp
  from lmfusion_jax.training import online_encoding
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, SIZE, SIZE, 3)), jnp.float32)
  out = np.asarray(online_encoding.augment(x, jax.random.key(3), 10, True))
  assert out.shape == (6, 10, 10, 3)
  flips = 0
  for img, got in zip(np.asarray(x), out):
    windows = {(i, j, f) for i in range(SIZE - 9) for j in range(SIZE - 9) for f in (0, 1)
               if np.array_equal((img[:, ::-1] if f else img)[i:i + 10, j:j + 10], got)}
    assert windows, "not a (flipped) window of the image"
    flips += min(f for _, _, f in windows)
  assert 0 < flips < 6    # both outcomes occur for this key
  assert np.array_equal(np.asarray(online_encoding.augment(x, jax.random.key(3), SIZE, False)), np.asarray(x))
  from lmfusion_jax.checkpoints.vae import load_vae
  from lmfusion_jax.training.online_encoding import OnlineEncoding, encode_pixels
  from flax import nnx
  from lmfusion_jax.models.vae import EncoderOnly
  cfg, module = load_vae(tiny_vae[0])
  params = nnx.to_pure_dict(nnx.state(EncoderOnly(module)))
  px = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 3, SIZE, SIZE, 3), dtype=np.uint8))
  z = encode_pixels(OnlineEncoding(cfg, crop_size=12), params, px, jnp.ones((2, 3), bool), jax.random.key(0))
  assert z.shape == (2, 3, 6, 6, 4)


def test_config_errors(datasets, tiny_vae, tokenizer_dir, tmp_path):
  from lmfusion_jax.training.loop import train
  cases = [
      (["--config.data.encode=online"], "data.vae_dir is empty"),
      (["--config.data.encode=sometimes"], "data.encode='sometimes'"),
      (["--config.data.encode=online", f"--config.data.vae_dir={tiny_vae[0]}", "--config.data.builder_config=res16"],
       "no 'image' field"),
      (["--config.data.builder_config=png16"], "--config.data.encode=online"),
      (["--config.data.encode=online", f"--config.data.vae_dir={tiny_vae[0]}", "--config.fusion.latent_channels=1"],
       r"fusion.latent_size=8, fusion.latent_channels=1"),
      (["--config.data.encode=online", f"--config.data.vae_dir={tiny_vae[0]}", "--config.data.crop_size=32"],
       "data.crop_size=32 is larger"),
  ]
  for i, (overrides, words) in enumerate(cases):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("[", r"\[")):
      train(tiny_cfg(tokenizer_dir, datasets, tmp_path / f"r{i}", *overrides))


def test_plan_reports_the_encoder_share(tiny_vae):
  """`plan` with data.encode=online compiles the encoding stage for the mesh and reports its share."""
  from lmfusion_jax.planning import plan as plan_lib, report as report_lib
  from lmfusion_jax.run_config import apply_overrides, load_config
  cfg = apply_overrides(load_config("configs/tiny.py"), [
      "--config.data.encode=online", f"--config.data.vae_dir={tiny_vae[0]}", f"--config.data.image_size={SIZE}",
      "--config.fusion.latent_channels=4", "--config.fusion.image_io=linear", "--config.model.n_layers=1"])
  r = plan_lib.plan(cfg, "v5e-8")
  e = r.encoder
  assert e["images_per_step"] == 16 and e["images_per_chip"] == 2 and e["seconds"] > 0 and e["flops_per_step"] > 0
  assert 0 < r.encoder_share < 1 and r.to_dict()["encoder_share"] == r.encoder_share
  text = report_lib.format_report(r)
  assert "online encoding (data.encode=online)" in text and "encoder share" in text, text


def test_pixel_mapping_in_the_step_is_numpys_bitwise():
  """Every byte value: the jitted mapping == numpy's x / 127.5 - 1 (prepare-data's host expression), bit for bit."""
  from lmfusion_jax.models.vae import to_model_range_on_device
  pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)[..., None].repeat(3, -1)   # [4, 8, 8, 3]
  want = pixels.astype(np.float32) / 127.5 - 1.0
  got = np.asarray(jax.jit(to_model_range_on_device)(pixels))
  assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_eval_records_of_a_png_dataset_are_encoded_like_training(datasets, tiny_vae, tokenizer_dir, tmp_path):
  """`eval` on an online-encoded run reads the png records and encodes them with data.vae_dir: the latents of
  the precomputed dataset, within the tolerance above; without a VAE the error names the field."""
  from lmfusion_jax.evaluation.setup import read_records
  from lmfusion_jax.models.config import ConfigError
  pre = tiny_cfg(tokenizer_dir, datasets, tmp_path / "a")
  onl = tiny_cfg(tokenizer_dir, datasets, tmp_path / "b", "--config.data.encode=online",
                 f"--config.data.vae_dir={tiny_vae[0]}")
  a, b = read_records(pre.data, "train"), read_records(onl.data, "train")
  assert [r["id"] for r in a] == [r["id"] for r in b] and [r["caption"] for r in a] == [r["caption"] for r in b]
  diff = max(float(np.abs(x["latent"] - y["latent"]).max()) for x, y in zip(a, b))
  assert diff <= LATENT_ATOL and b[0]["latent"].shape == (8, 8, 4), diff
  onl.data.vae_dir = ""
  with pytest.raises(ConfigError, match="data.vae_dir"):
    read_records(onl.data, "train")
