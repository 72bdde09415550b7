"""LLaVAFusion: LMFusion training started from a LLaVA checkpoint (convert-llava) on the digits data, on 8 devices.
The VLM's text and vision never change (no optimizer state for either; vision is not even loaded), the image branch
trains, and the understanding path of the trained run (its text + its init_from's vision) gives the same logits and
greedy tokens as the converted VLM, to the bit."""
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clip_models import real_looking_uint8  # noqa: E402
from conftest import make_tiny_config  # noqa: E402
from llava_models import make_hf_llava  # noqa: E402
from lmfusion_jax import cli  # noqa: E402
from lmfusion_jax.checkpoints import params as params_io  # noqa: E402
from test_train import paths, restore_final  # noqa: E402


@pytest.fixture(scope="module")
def llavafusion_run(tokenizer_dir, digits_data_dir, tmp_path_factory):
  """(work dir, run config): a tiny HF LLaVA on the digits tokenizer (+ <image>), converted, trained 4 steps."""
  from lmfusion_jax.data.tokenizer import load_tokenizer
  from lmfusion_jax.training.loop import train
  work = tmp_path_factory.mktemp("llavafusion")
  tok = load_tokenizer(tokenizer_dir)
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  image_token = tok.convert_tokens_to_ids("<image>")
  make_hf_llava(work / "hf", "llava-clip", seed=1, vocab=len(tok), image_token=image_token)
  tok.save_pretrained(str(work / "hf"))
  old = os.getcwd()
  os.chdir(work)
  try:
    assert cli.main(["convert-llava", "--hf-dir", "hf", "--out", "ck", "--image-io", "linear", "--latent-size", "8",
                     "--latent-channels", "1"]) == 0
  finally:
    os.chdir(old)
  cfg = make_tiny_config(str(work / "ck" / "tokenizer"), digits_data_dir, work / "run")
  cfg.init_from = str(work / "ck")
  cfg.model = {"preset": "init", "max_seq_len": 512}
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
  cfg.total_steps, cfg.save_every = 4, 4
  train(cfg)
  return work, cfg


def test_text_frozen_vision_untouched_image_trained(llavafusion_run):
  work, cfg = llavafusion_run
  spec, _, state = restore_final(cfg)
  assert spec.trainable == ("image",)
  init_text = params_io.load_params(str(work / "ck"), subtree="text")
  for a, b in zip(jax.tree.leaves(state["params"]["text"]), jax.tree.leaves(init_text), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  init_image = params_io.load_params(str(work / "ck"), subtree="image")
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state["params"]["image"]), jax.tree.leaves(init_image), strict=True)]
  assert sum(changed) > 0.9 * len(changed)
  assert sorted(state["params"]) == ["image", "text"]                    # the vision part is not in training
  opt = paths(state["opt_state"])
  assert opt and not any(part in p.split("/") for p in opt for part in ("text", "vision"))


def test_understanding_after_training_is_bit_identical(llavafusion_run):
  from lmfusion_jax.inference import llava_generate as gen
  from lmfusion_jax.inference import llava_preprocess as pre
  work, cfg = llavafusion_run
  before, after = gen.load_llava(str(work / "ck")), gen.load_llava(cfg.workdir)
  assert gen.llava_source(cfg.workdir) == str(work / "ck")
  pixels = [pre.preprocess(before.cfg, real_looking_uint8(5, 21, 34))]
  image = before.cfg.image_token_index
  prompt = pre.expand_image_tokens([1, 40, 41, image, 50, 51], before.cfg, [p.num_tokens for p in pixels])
  a = np.asarray(gen.prompt_logits(before, pixels, [prompt]))
  b = np.asarray(gen.prompt_logits(after, pixels, [prompt]))
  assert a.tobytes() == b.tobytes()
  assert gen.generate(before, pixels, [prompt], 16, eos_ids=()) == gen.generate(after, pixels, [prompt], 16, eos_ids=())
