"""Checkpoints written before the redesign (tests/fixtures/legacy, see its README) still load and give the
outputs the code that wrote them computed: forward logits / noise, greedy captions, sampled image latents,
greedy text, and a resumed training step."""
import copy
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from lmfusion_jax.inference import caption as cap
from lmfusion_jax.inference import text as gen
from lmfusion_jax.inference import image as gi
from lmfusion_jax.inference import loading as model_loading
from lmfusion_jax.models import sharded
from lmfusion_jax.models.inputs import ImageInputs, TextInputs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")
MODEL_INPUTS = ("tokens", "text_positions", "text_segment_ids", "latents", "timesteps", "image_positions",
                "image_segment_ids")


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@pytest.mark.parametrize("name", ["params_ckpt", "train_workdir"])
def test_legacy_checkpoint_outputs(name, expected):
  loaded = model_loading.load_model(os.path.join(FIXTURE, name))
  model = loaded.model()
  e = {k: jnp.asarray(expected[k]) for k in MODEL_INPUTS}
  logits, eps, _ = model(TextInputs(e["tokens"], e["text_positions"], e["text_segment_ids"]),
                         ImageInputs(e["latents"], e["timesteps"], e["image_positions"], e["image_segment_ids"]))
  np.testing.assert_allclose(np.asarray(logits), expected[f"{name}/logits"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(eps), expected[f"{name}/eps"], rtol=0, atol=1e-6)
  ids = cap.caption_latents(model, expected["caption_latents"], 8, eos_ids=())
  np.testing.assert_array_equal(np.asarray(ids), expected[f"{name}/caption_ids"])
  lat = gi.generate_images(model, [[5, 6, 7], [8]], loaded.diffusion, num_steps=4, sampler="ddim",
                           cfg_scale=2.0, seed=1)
  np.testing.assert_allclose(np.asarray(lat), expected[f"{name}/image_latents"], rtol=0, atol=1e-5)
  toks = gen.generate(sharded.model(loaded.llama, None, {"text": loaded.params["text"]}), [[1, 5, 6], [1, 9]], 6, eos_ids=())
  np.testing.assert_array_equal(np.asarray(toks), expected[f"{name}/text_ids"])


def test_legacy_training_workdir_resumes(expected, tmp_path):
  from lmfusion_jax.run_config import load_config
  from lmfusion_jax.training.loop import train
  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(FIXTURE, "train_workdir"), workdir)
  cfg = load_config("configs/tiny.py:synthetic")
  cfg.workdir = str(workdir)
  cfg.data.tokenizer_dir = os.path.join(FIXTURE, "tokenizer")
  cfg.data.synthetic_num_records = 64
  cfg.data.on_bad_record = "skip"
  cfg.tensorboard = False
  cfg.total_steps, cfg.save_every, cfg.log_every = 3, 2, 1
  metrics = train(copy.deepcopy(cfg))
  assert metrics["step"] == 3
  np.testing.assert_allclose(metrics["loss"], expected["resumed_step3/loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["image_loss"], expected["resumed_step3/image_loss"], rtol=1e-6)
