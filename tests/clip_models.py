"""Tiny random Hugging Face CLIP / SigLIP models built offline, for tests/test_clip.py and the tests that need a
CLIP folder (CLIP score in tests/test_eval_distributed.py, convert-clip in tests/test_clip_convert.py).

A CLIP BPE tokenizer from a hand-written byte-level vocab and merges; random weights drawn wide (norm weights around
1, biases non-zero) so a mapping error cannot hide below the tolerance."""
import argparse
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lmfusion_jax.models import clip as clip_lib

WORDS = ("a", "photo", "of", "red", "cat", "dog", "two", "blue", "birds", "on", "tree", "the")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.28)    # not CLIP's defaults: proves they are read from the folder


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def write_tokenizer(folder):
  """A CLIPTokenizer: the 256 byte symbols with and without </w>, merges spelling out WORDS, then
  <|startoftext|>, <|endoftext|> as the two largest ids (as in OpenAI's vocab). Returns the vocab size."""
  from tokenizers.pre_tokenizers import ByteLevel
  symbols = sorted(ByteLevel.alphabet())
  vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
  merges = []
  for w in WORDS:
    pieces = list(w[:-1]) + [w[-1] + "</w>"]
    while len(pieces) > 1:
      merges.append((pieces[0], pieces[1]))
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      vocab.setdefault(pieces[0], len(vocab))
  for special in ("<|startoftext|>", "<|endoftext|>"):
    vocab[special] = len(vocab)
  transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(folder))
  return len(vocab)


def randomize(model, seed):
  """Wide random weights: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2), other vectors ~ N(0, 0.3)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        continue
      r = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        p.copy_(r / math.sqrt(np.prod(p.shape[1:])) if "embedding" not in name else 0.5 * r)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * r)
      else:
        p.copy_(0.3 * r)
  return model


def vision_kw(**kw):
  return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **kw)


def images_nchw(seed, n, size):
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def real_looking_uint8(seed: int, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3]: a smooth colour gradient, a few filled discs, mild noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  a = rng.uniform(0, 1, (3, 3))
  img = a[:, 0] + a[:, 1] * yy[..., None] + 0.5 * a[:, 2] * xx[..., None]
  for _ in range(4):
    cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0, 1, 3)
  img = np.clip(img / img.max() + rng.normal(0, 0.03, img.shape), 0, 1)
  return (img * 255).round().astype(np.uint8)



def make_hf_clip(folder):
  """A tiny random HF CLIPModel folder (tokenizer, preprocessor_config.json) at `folder` (created). Name it with
  "openai" in it when torchmetrics is to read it: it only accepts such local paths."""
  folder.mkdir(parents=True)
  vocab = write_tokenizer(folder)
  text = dict(vision_kw(), vocab_size=vocab, max_position_embeddings=16, bos_token_id=vocab - 2,
              eos_token_id=vocab - 1, pad_token_id=vocab - 1)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision_kw(image_size=32, patch_size=4),
                                projection_dim=24)
  randomize(transformers.CLIPModel(cfg), seed=0).save_pretrained(str(folder), safe_serialization=True)
  (folder / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
      "crop_size": {"height": 32, "width": 32}, "do_resize": True, "do_center_crop": True, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
      "resample": 3, "do_convert_rgb": True}))
  return folder


# --- shared by the CLIP tests: tolerance, jitted forwards, module fixtures (import them into a test module) ---

TOL = 1e-4

# Jitted forwards (compiled once per model structure and input shape; eager calls re-trace the layer scan).
vision_fwd = nnx.jit(lambda tower, x: tower(x))
text_fwd = nnx.jit(lambda text, ids, mask: text(ids, mask))
image_embeds = nnx.jit(clip_lib.image_embeds)
text_embeds = nnx.jit(clip_lib.text_embeds)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
  """A tiny random HF CLIPModel folder (tokenizer, preprocessor_config.json); "openai" in its name for torchmetrics."""
  return make_hf_clip(tmp_path_factory.mktemp("clip") / "openai-tiny-clip")


@pytest.fixture(scope="module")
def converted(hf_clip_dir):
  from lmfusion_jax.convert import hf_clip
  return hf_clip.load_hf_clip(hf_clip_dir)


@pytest.fixture(scope="module")
def converted_dir(hf_clip_dir, tmp_path_factory):
  from lmfusion_jax.commands import convert_clip
  out = tmp_path_factory.mktemp("converted") / "clip"
  args = argparse.Namespace(hf_dir=str(hf_clip_dir), out=str(out), overwrite=False)
  assert convert_clip.run(args) == 0
  return out
