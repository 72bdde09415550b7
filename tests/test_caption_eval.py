"""Captioning (KV cache vs full recompute, training layout), interleaved generation, the caption CLI, the
eval metrics' pieces against direct computations, and `eval` of a checkpoint trained on an 8-device mesh
(fsdp=4, tensor=2) giving the same numbers on 1 device."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lmfusion_jax import cli, diffusion, sharding
from lmfusion_jax.inference import caption as cap
from lmfusion_jax.inference.interleaved import generate_interleaved
from lmfusion_jax.inference.sampler import Sampler
from lmfusion_jax.models.inputs import ImageInputs, TextInputs
from lmfusion_jax.evaluation import evaluate as ev
from lmfusion_jax.inference import image as gi
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.data import eval_sets
from lmfusion_jax.data.sequences import layout_document
from test_sampling import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return tiny_model(image_io="unet", seed=4)


def latents(n, seed=0):
  return np.asarray(jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1), minval=-1, maxval=1))


def test_cached_captions_equal_full_recompute(model):
  lat = latents(3)
  cached = cap.caption_latents(model, lat, 10, eos_ids=())         # never stop: compare all 10 tokens
  full = cap.caption_latents(model, lat, 10, eos_ids=(), use_cache=False)
  assert cached == full
  assert all(len(c) == 10 for c in cached) and len({tuple(c) for c in cached}) > 1  # image-dependent
  # stopping at EOS: rows end at their first EOS, identically on both paths
  eos = [cached[0][3]]
  assert cap.caption_latents(model, lat, 10, eos_ids=eos) == cap.caption_latents(model, lat, 10, eos_ids=eos,
                                                                                  use_cache=False)
  stopped = cap.caption_latents(model, lat, 10, eos_ids=eos)
  for row, full_row in zip(stopped, cached):
    assert row == (full_row[:full_row.index(eos[0]) + 1] if eos[0] in full_row else full_row)


def test_first_logits_follow_the_image_first_training_layout(model):
  """The prefix `BOS BOI image EOI` laid out exactly as training's image-first documents (data.sequences),
  run through one full forward: its EOI logits are the cached captioner's first-step logits, and its argmax
  continuation is the first caption tokens."""
  lcfg, fcfg = model.lcfg, model.fcfg
  special = {"bos": lcfg.bos_id, "eos": lcfg.eos_id, "boi": fcfg.boi_id, "eoi": fcfg.eoi_id}
  lat = latents(2, seed=1)
  first = cap.caption_latents(model, lat, 2, eos_ids=())
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, tok, pos, seg, lat, t, ipos, iseg: nnx.merge(graphdef, st)(
      TextInputs(tok, pos, seg), ImageInputs(lat, t, ipos, iseg))[0])
  for row in range(2):
    doc = layout_document("x", [first[row][0]], lat[row], caption_first=False, special=special,
                          tokens_per_image=fcfg.tokens_per_image)
    # doc: BOS BOI EOI c1 EOS; keep BOS BOI EOI c1
    tokens, pos = doc.tokens[None, :4], doc.text_positions[None, :4]
    logits = forward(state, jnp.asarray(tokens), jnp.asarray(pos), jnp.ones_like(jnp.asarray(tokens)),
                     jnp.asarray(doc.latents[None]), jnp.zeros((1, 1), jnp.int32),
                     jnp.asarray(doc.image_positions[None]), jnp.ones((1, 1), jnp.int32))
    cached_logits, _ = Sampler(model).prefill_image(lat[row:row + 1], cache_len=32)
    np.testing.assert_allclose(np.asarray(cached_logits[0]), np.asarray(logits[0, 2]), atol=1e-5, rtol=1e-5)
    assert int(jnp.argmax(logits[0, 2])) == first[row][0] and int(jnp.argmax(logits[0, 3])) == first[row][1]


def test_interleaved_generation_text_image_text():
  """With a zero LM head every logit ties and argmax picks id 0, which this model uses as BOI: the model
  'asks' for an image right after the prompt. That image must be the text-to-image sample for the same
  prefix `BOS prompt BOI`; text generation then continues after EOI."""
  m = tiny_model(boi=0, seed=2)
  m.text.lm_head[...] = jnp.zeros_like(m.text.lm_head[...])
  dcfg = diffusion.DiffusionConfig()
  kw = dict(num_steps=3, sampler="ddim", cfg_scale=2.0, seed=11, clip_x0=1.0)
  segments = generate_interleaved(m, [m.lcfg.bos_id, 7, 8], dcfg, max_new_tokens=4, max_images=1, **kw)
  kinds = [k for k, _ in segments]
  assert kinds == ["text", "image", "text"]
  assert segments[0][1] == [0] and segments[2][1] == [0, 0, 0]       # 4 text tokens in total
  want = np.asarray(gi.generate_images(m, [[7, 8]], dcfg, **kw))[0]
  np.testing.assert_allclose(segments[1][1], want, atol=1e-5)


def test_caption_cli_reads_png_and_matches_library(tmp_path, tokenizer_dir):
  from lmfusion_jax.data.tokenizer import load_tokenizer, special_ids
  sp = special_ids(load_tokenizer(tokenizer_dir))
  m = tiny_model(vocab=512, bos=sp["bos"], eos=sp["eos"], boi=sp["boi"], eoi=sp["eoi"], seed=3)
  params_io.save_params(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(m)), m.lcfg, m.fcfg)
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "img.png")
  import io
  from contextlib import redirect_stdout
  buf = io.StringIO()
  with redirect_stdout(buf):
    rc = cli.main(["caption", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", tokenizer_dir,
                   "--image", str(tmp_path / "img.png"), "--max-new-tokens", "6", "--json"])
  assert rc == 0
  out = json.loads(buf.getvalue().strip().splitlines()[-1])
  want = cap.caption_latents(m, (pixels.astype(np.float32) / 127.5 - 1.0)[None, :, :, None], 6)[0]
  assert out["tokens"] == want and out["image"].endswith("img.png") and isinstance(out["caption"], str)


def test_text_nll_matches_per_caption_log_softmax(model):
  """The eval's packed, batched, padded text NLL equals summing -log p(next token) over each document alone."""
  import ml_collections
  from lmfusion_jax.evaluation.text_nll import held_out_text_metrics
  lcfg, fcfg = model.lcfg, model.fcfg
  captions = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
  data_cfg = ml_collections.ConfigDict(dict(text_len=12, global_batch_size=8))   # 1 row per device
  mesh = sharding.make_mesh(fsdp=-1)
  params = nnx.to_pure_dict(nnx.state(model))
  m = held_out_text_metrics(params, lcfg, fcfg, data_cfg, captions, mesh)
  nll, count = m["text_nll"], m["text_tokens"]
  graphdef, state = nnx.split(model.text)
  text_logits = jax.jit(lambda st, tokens: nnx.merge(graphdef, st)(tokens)[0])
  total, n = 0.0, 0
  for c in captions:
    doc = [lcfg.bos_id] + c + [lcfg.eos_id]
    logits = text_logits(state, jnp.asarray([doc]))
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    total -= sum(float(logp[i, doc[i + 1]]) for i in range(len(doc) - 1))
    n += len(doc) - 1
  assert count == n == 3 + 1 + 5 + 3
  assert abs(nll - total / n) < 1e-5


def test_references_and_prompts_for_digits():
  rec = {"label": 7, "caption": "digit 7"}
  refs = eval_sets.references("digits", rec)
  assert "a handwritten digit seven" in refs and "digit 7" in refs and len(refs) == 8
  assert eval_sets.references("image_captions", rec) == ["digit 7"]
  prompts, labels = eval_sets.generation_prompts("digits", [], 2, 0)
  assert len(prompts) == 20 and labels == [c for c in range(10) for _ in range(2)]
  assert prompts[0] == "a handwritten digit zero" and prompts[3] == "the number 1 written by hand"


EVAL_OVERRIDES = ["--config.eval.num_examples=12", "--config.eval.samples_per_class=1",
                  "--config.eval.sampling_steps=3", "--config.eval.caption_max_new_tokens=6",
                  "--config.eval.batch_size=16", "--config.eval.timesteps=(100, 500, 900)"]


@pytest.mark.slow
def test_eval_of_8_device_checkpoint_on_1_device_gives_same_numbers(tokenizer_dir, digits_data_dir, frozen_run):
  cfg, _ = frozen_run  # trained on an fsdp=4 x tensor=2 mesh, checkpoints at steps 2 and 4
  assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (4, 2)
  on_8 = ev.evaluate(cfg.workdir, cfg, EVAL_OVERRIDES, mesh=sharding.make_mesh(fsdp=4, tensor=2))

  config_args = [f"--config.data.data_dir={digits_data_dir}", f"--config.data.tokenizer_dir={tokenizer_dir}"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "lmfusion_jax.cli", "eval", "--checkpoint",
                         os.path.join(cfg.workdir, "checkpoints", "4"), "--config", "configs/tiny.py",
                         *config_args, *EVAL_OVERRIDES], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  on_1 = json.loads(proc.stdout.strip().splitlines()[-1])
  assert on_1["devices"] == 1 and on_8["devices"] == 8
  numeric = ["text_nll", "text_perplexity", "text_tokens", "diffusion_loss_t100", "diffusion_loss_t500",
             "diffusion_loss_t900", "diffusion_loss_mean", "cider_d", "caption_accuracy", "generation_accuracy",
             "fid", "num_examples", "num_generated"]
  for k in numeric:
    assert k in on_8 and k in on_1, k
    assert on_1[k] == pytest.approx(on_8[k], rel=1e-5, abs=1e-6), k
  assert on_1["caption_examples"] == on_8["caption_examples"]
  # fields in range
  assert on_8["num_examples"] == 12 and on_8["num_generated"] == 10 and on_8["text_tokens"] > 12
  assert 0 < on_8["text_nll"] < 20 and on_8["text_perplexity"] == pytest.approx(math.exp(on_8["text_nll"]))
  assert all(0 < on_8[f"diffusion_loss_t{t}"] < 10 for t in (100, 500, 900))
  assert 0.0 <= on_8["cider_d"] <= 10.0
  assert 0.0 <= on_8["caption_accuracy"] <= 1.0 and 0.0 <= on_8["generation_accuracy"] <= 1.0
  assert on_8["fid"] is not None and on_8["fid"] >= -1e-6
