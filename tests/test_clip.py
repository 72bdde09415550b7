"""Flax CLIP / SigLIP vs Hugging Face on tiny random models (float32): vision towers (every hidden state, the last
one, the pooled output), CLIP text and image embeddings, the vision-tower prefixes LLaVA checkpoints use, the CLIP
score vs torchmetrics' CLIPScore, `convert-clip` from another directory with relative paths, and bad inputs.

The models are built offline: a CLIP BPE tokenizer from a hand-written byte-level vocab and merges, random weights
drawn wide (norm weights around 1, biases non-zero) so a mapping error cannot hide below the tolerance.
torchmetrics 1.9 predates transformers 5, whose get_image_features / get_text_features return a
BaseModelOutputWithPooling instead of a tensor, so its model is handed over (a documented torchmetrics option:
a callable returning model and processor) behind a wrapper returning `.pooler_output`; everything else
(CLIPProcessor from the folder, the cut to max_position_embeddings, the score) is torchmetrics' own."""
import argparse
import dataclasses
import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfusion_jax.checkpoints.files import CheckpointError  # noqa: E402
from lmfusion_jax.cli import COMMANDS, main  # noqa: E402
from lmfusion_jax.commands import convert_clip  # noqa: E402
from lmfusion_jax.convert import hf_clip  # noqa: E402
from lmfusion_jax.errors import UserError  # noqa: E402
from lmfusion_jax.evaluation.metrics import clip_score as cs  # noqa: E402
from lmfusion_jax.models import clip as clip_lib  # noqa: E402
from lmfusion_jax.models.vision_tower import VisionTower  # noqa: E402
from lmfusion_jax.sharding import logical_to_spec  # noqa: E402

TOL = 1e-4
WORDS = ("a", "photo", "of", "red", "cat", "dog", "two", "blue", "birds", "on", "tree", "the")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.28)    # not CLIP's defaults: proves they are read from the folder
assert "convert-clip" in COMMANDS


# Jitted forwards (compiled once per model structure and input shape; eager calls re-trace the layer scan).
vision_fwd = nnx.jit(lambda tower, x: tower(x))
text_fwd = nnx.jit(lambda text, ids, mask: text(ids, mask))
image_embeds = nnx.jit(clip_lib.image_embeds)
text_embeds = nnx.jit(clip_lib.text_embeds)


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


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
  """A tiny random HF CLIPModel folder (tokenizer, preprocessor_config.json). The name holds "openai": torchmetrics
  only accepts such local paths."""
  folder = tmp_path_factory.mktemp("clip") / "openai-tiny-clip"
  folder.mkdir()
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


@pytest.fixture(scope="module")
def hf_model(hf_clip_dir):
  return transformers.CLIPModel.from_pretrained(str(hf_clip_dir)).eval()


@pytest.fixture(scope="module")
def converted(hf_clip_dir):
  return hf_clip.load_hf_clip(hf_clip_dir)


@pytest.fixture(scope="module", params=[True, False], ids=["head", "no_head"])
def siglip_dir(request, tmp_path_factory):
  """A tiny random HF SiglipVisionModel folder (image 30, patch 6), with and without the pooling head."""
  folder = tmp_path_factory.mktemp("siglip")
  cfg = transformers.SiglipVisionConfig(**vision_kw(image_size=30, patch_size=6), vision_use_head=request.param)
  randomize(transformers.SiglipVisionModel(cfg), seed=1).save_pretrained(str(folder), safe_serialization=True)
  return folder


# --- parity -------------------------------------------------------------------------------------------------

def test_clip_vision_tower_matches_hf(hf_model, converted):
  _, model = converted
  x = images_nchw(0, 3, 32)
  with torch.no_grad():
    ref = hf_model.vision_model(torch.from_numpy(x), output_hidden_states=True)
  out = vision_fwd(model.vision, nhwc(x))
  hidden = np.stack([h.numpy() for h in ref.hidden_states])          # [L + 1, b, s, D]
  assert out.hidden_states.shape == hidden.shape == (3, 3, 65, 32)
  diffs = {"hidden_states": max_diff(out.hidden_states, hidden),
           "last": max_diff(out.last_hidden_state, ref.last_hidden_state),
           "pooled": max_diff(out.pooled, ref.pooler_output)}
  print("clip vision max |diff|:", diffs)
  assert max(diffs.values()) < TOL, diffs
  assert float(np.abs(hidden).max()) > 1.0     # the comparison is not of near-zero values


def test_clip_embeddings_match_hf(hf_model, converted, hf_clip_dir):
  cfg, model = converted
  assert cfg.text.eos_token_id == cfg.text.vocab_size - 1 and cfg.projection_dim == 24
  x = images_nchw(1, 2, 32)
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_clip_dir))
  enc = tok(["a red cat", "two blue birds on the tree, a photo"], padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert (ids == cfg.text.eos_token_id).any(axis=1).all() and mask.min() == 0     # EOS in each row, padding
  with torch.no_grad():
    ref_img = hf_model.get_image_features(torch.from_numpy(x)).pooler_output.numpy()
    ref_txt = hf_model.get_text_features(torch.from_numpy(ids), torch.from_numpy(mask)).pooler_output.numpy()
    ref_text = hf_model.text_model(torch.from_numpy(ids), torch.from_numpy(mask))
  last, pooled = text_fwd(model.text, jnp.asarray(ids), jnp.asarray(mask))
  diffs = {"image_embeds": max_diff(image_embeds(model, nhwc(x)), ref_img),
           "text_embeds": max_diff(text_embeds(model, jnp.asarray(ids), jnp.asarray(mask)), ref_txt),
           "text_last": max_diff(last, ref_text.last_hidden_state),
           "text_pooled": max_diff(pooled, ref_text.pooler_output)}
  print("clip embeddings max |diff|:", diffs)
  assert max(diffs.values()) < TOL, diffs
  assert float(np.asarray(model.logit_scale[...])) == pytest.approx(float(hf_model.logit_scale.detach()), abs=0)


def test_legacy_eos_rule_matches_hf(hf_model, converted):
  """eos_token_id == 2 (old CLIP configs): pooled at argmax(input_ids), here not where the EOS is."""
  cfg, model = converted
  legacy_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=2))
  legacy = hf_clip.build_module(lambda: clip_lib.CLIP(legacy_cfg, rngs=nnx.Rngs(0)), hf_clip.flat_params(model))
  ids = np.array([[30, 400, 5, 3, 7, 2]])     # no EOS: legacy pools at the largest id (1), the other rule at 0
  hf_model.text_model.eos_token_id = 2
  try:
    with torch.no_grad():
      ref = hf_model.get_text_features(torch.from_numpy(ids)).pooler_output.numpy()
  finally:
    hf_model.text_model.eos_token_id = cfg.text.eos_token_id
  assert int(clip_lib.eos_positions(jnp.asarray(ids), 2)[0]) == 1
  assert max_diff(text_embeds(legacy, jnp.asarray(ids)), ref) < TOL
  assert max_diff(text_embeds(model, jnp.asarray(ids)), ref) > 1e-2   # the other rule differs here


def test_siglip_vision_tower_matches_hf(siglip_dir):
  cfg, tower = hf_clip.load_hf_vision_tower(siglip_dir)
  assert cfg.variant == "siglip" and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.layer_norm_eps == 1e-6
  hf = transformers.SiglipVisionModel.from_pretrained(str(siglip_dir)).eval()
  x = images_nchw(2, 2, 30)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x), output_hidden_states=True)
  out = vision_fwd(tower, nhwc(x))
  hidden = np.stack([h.numpy() for h in ref.hidden_states])
  assert out.hidden_states.shape == hidden.shape == (3, 2, 25, 32)
  diffs = {"hidden_states": max_diff(out.hidden_states, hidden),
           "last": max_diff(out.last_hidden_state, ref.last_hidden_state)}
  if cfg.use_head:
    diffs["pooled"] = max_diff(out.pooled, ref.pooler_output)
  else:
    assert out.pooled is None and ref.pooler_output is None
  print(f"siglip (use_head={cfg.use_head}) max |diff|:", diffs)
  assert max(diffs.values()) < TOL, diffs


def same_params(a, b) -> bool:
  pa, pb = hf_clip.flat_params(a), hf_clip.flat_params(b)
  return pa.keys() == pb.keys() and all(np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])) for k in pa)


def test_vision_tower_prefixes(hf_clip_dir, converted):
  """The same tensors under every prefix HF / LLaVA write load into the same tower."""
  cfg, model = converted
  full = safetensors.numpy.load_file(str(hf_clip_dir / "model.safetensors"))
  bare = {k[len("vision_model."):]: v for k, v in full.items() if k.startswith("vision_model.")}
  for prefix in ("", "vision_model.", "vision_tower.", "vision_tower.vision_model.",
                 "model.vision_tower.vision_model."):
    sd = {prefix + k: v for k, v in bare.items()}
    if prefix:
      sd["model.language_model.embed_tokens.weight"] = np.zeros((4, 4), np.float32)   # other modules: ignored
    tower = hf_clip.vision_tower_from_state_dict(cfg.vision, sd, source=f"prefix {prefix!r}")
    assert same_params(tower, model.vision), prefix
  # a CLIPModel folder read as a vision tower (its text tensors are outside the prefix)
  vcfg, tower = hf_clip.load_hf_vision_tower(hf_clip_dir)
  assert vcfg == cfg.vision and same_params(tower, model.vision)


def test_siglip_prefixes(siglip_dir):
  """The transformers-5 SiglipVisionModel file is bare; LLaVA's form carries vision_tower.vision_model."""
  cfg, tower = hf_clip.load_hf_vision_tower(siglip_dir)
  sd = safetensors.numpy.load_file(str(siglip_dir / "model.safetensors"))
  for prefix in ("vision_model.", "vision_tower.vision_model."):
    other = hf_clip.vision_tower_from_state_dict(cfg, {prefix + k: v for k, v in sd.items()})
    assert same_params(other, tower), prefix


def test_parameters_have_logical_names(converted):
  _, model = converted
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.value.ndim, (path, names)
    logical_to_spec(names)    # every name has a sharding rule
  assert len(flat) > 40


# --- CLIP score ---------------------------------------------------------------------------------------------

class _FeaturesAsTensors(torch.nn.Module):
  """transformers 5 CLIPModel with the transformers 4 feature API torchmetrics 1.9 calls (tensors, not outputs)."""

  def __init__(self, model):
    super().__init__()
    self.model, self.config = model, model.config

  def get_image_features(self, *args, **kw):
    return self.model.get_image_features(*args, **kw).pooler_output

  def get_text_features(self, *args, **kw):
    return self.model.get_text_features(*args, **kw).pooler_output


CAPTIONS = ["a red cat", "a photo of two blue birds on a tree", "the dog",
            "a photo of a red dog on the tree and two blue birds and a cat on the tree"]   # > 16 tokens: cut
SIZES = [(50, 70), (224, 224), (20, 40), (80, 36)]     # down and up, wide and tall


@pytest.fixture(scope="module")
def converted_dir(hf_clip_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted") / "clip"
  args = argparse.Namespace(hf_dir=str(hf_clip_dir), out=str(out), overwrite=False)
  assert convert_clip.run(args) == 0
  return out


def test_preprocessing_matches_clip_processor(hf_clip_dir, converted_dir):
  ckpt = hf_clip.load_clip(converted_dir)
  assert ckpt.image_processor.image_mean == MEAN and ckpt.image_processor.crop_hw == (32, 32)
  processor = transformers.CLIPProcessor.from_pretrained(str(hf_clip_dir))
  for i, (h, w) in enumerate(SIZES):
    img = real_looking_uint8(i, h, w)
    ref = processor(images=[torch.from_numpy(img.transpose(2, 0, 1).copy())], return_tensors="np")["pixel_values"]
    assert max_diff(cs.preprocess_image(img, ckpt.image_processor), ref[0].transpose(1, 2, 0)) < 1e-6, (h, w)


def test_clip_score_matches_torchmetrics(hf_clip_dir, converted_dir):
  from torchmetrics.functional.multimodal.clip_score import _clip_score_update
  from torchmetrics.multimodal.clip_score import CLIPScore

  def model_and_processor():
    model = transformers.CLIPModel.from_pretrained(str(hf_clip_dir)).eval()
    return _FeaturesAsTensors(model), transformers.CLIPProcessor.from_pretrained(str(hf_clip_dir))

  images = [real_looking_uint8(10 + i, h, w) for i, (h, w) in enumerate(SIZES)]
  torch_images = [torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images]
  metric = CLIPScore(model_name_or_path=model_and_processor)
  with torch.no_grad(), pytest.warns(UserWarning, match="longer than"):
    metric.update(torch_images, CAPTIONS)
    want = float(metric.compute())
    per_pair_want, _ = _clip_score_update(torch_images, CAPTIONS, *model_and_processor())
  score, per_pair = cs.clip_score(hf_clip.load_clip(converted_dir), images, CAPTIONS, batch_size=3)
  print(f"clip score: ours {score:.6f} torchmetrics {want:.6f}; per pair max |diff| "
        f"{max_diff(per_pair, per_pair_want.numpy()):.2e}")
  assert want > 1.0       # a clamped 0 would compare nothing
  assert score == pytest.approx(want, rel=1e-3)
  np.testing.assert_allclose(per_pair, per_pair_want.numpy(), rtol=1e-3, atol=1e-3)
  # the folder path works too, and a bad pairing is refused
  assert cs.clip_score(str(converted_dir), images[:2], CAPTIONS[:2])[0] == pytest.approx(
      max(float(per_pair[:2].mean()), 0.0), rel=1e-5)
  with pytest.raises(UserError, match="2 images but 3 captions"):
    cs.clip_score(str(converted_dir), images[:2], CAPTIONS[:3])


# --- the converted folder and the command -------------------------------------------------------------------

def test_convert_clip_relative_paths_and_round_trip(hf_clip_dir, converted, tmp_path, monkeypatch, capsys):
  shutil.copytree(hf_clip_dir, tmp_path / "hf")
  (tmp_path / "run").mkdir()
  monkeypatch.chdir(tmp_path / "run")
  args = argparse.Namespace(hf_dir="../hf", out="out/clip", overwrite=False)
  assert convert_clip.run(args) == 0
  assert "convert-clip: wrote" in capsys.readouterr().out
  out = tmp_path / "run" / "out" / "clip"
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors", "tokenizer"]
  assert [p.name for p in (tmp_path / "run" / "out").iterdir()] == ["clip"]      # no temporary left behind
  ckpt = hf_clip.load_clip("out/clip")
  assert ckpt.config == converted[0]
  for k, v in hf_clip.flat_params(converted[1]).items():
    assert np.array_equal(np.asarray(hf_clip.flat_params(ckpt.model)[k]), np.asarray(v)), k
  assert ckpt.tokenizer()("a cat")["input_ids"][-1] == converted[0].text.eos_token_id
  # an existing non-empty output is refused (nothing changed); an empty one is filled
  with pytest.raises(UserError, match="already exists"):
    convert_clip.run(args)
  (tmp_path / "run" / "empty").mkdir()
  assert convert_clip.run(argparse.Namespace(hf_dir="../hf", out="empty", overwrite=False)) == 0
  assert (tmp_path / "run" / "empty" / "params.safetensors").exists()


def test_cli_convert_clip(hf_clip_dir, tmp_path, monkeypatch, capsys):
  """Needs `convert-clip` registered in lmfusion_jax/cli.py."""
  shutil.copytree(hf_clip_dir, tmp_path / "hf")
  (tmp_path / "run").mkdir()
  monkeypatch.chdir(tmp_path / "run")
  assert main(["convert-clip", "--hf-dir", "../hf", "--out", "clip"]) == 0
  assert hf_clip.load_clip(tmp_path / "run" / "clip").config.projection_dim == 24
  capsys.readouterr()
  assert main(["convert-clip", "--hf-dir", "../hf", "--out", "clip"]) == 2
  assert "already exists" in capsys.readouterr().err
  (tmp_path / "hf" / "model.safetensors").unlink()
  assert main(["convert-clip", "--hf-dir", "../hf", "--out", "clip2"]) == 2
  err = capsys.readouterr().err
  assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _rewrite_tensors(folder, change):
  path = folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(path))
  change(tensors)
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _bad_llama(folder):
  from hf_models import make_hf_llama
  make_hf_llama(folder)


def _bad_missing(folder):
  _rewrite_tensors(folder, lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"))


def _bad_shape(folder):
  def change(t):
    t["vision_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 30), np.float32)
  _rewrite_tensors(folder, change)


def _bad_extra(folder):
  def change(t):
    t["vision_model.encoder.layers.2.mlp.fc1.bias"] = np.zeros((64,), np.float32)
  _rewrite_tensors(folder, change)


def _bad_no_tokenizer(folder):
  for name in ("tokenizer.json", "vocab.json", "merges.txt"):
    if (folder / name).exists():
      (folder / name).unlink()


def _bad_preprocessor(folder):
  d = json.loads((folder / "preprocessor_config.json").read_text())
  d["crop_size"] = {"height": 48, "width": 48}
  (folder / "preprocessor_config.json").write_text(json.dumps(d))


BAD = {
    "llama": (_bad_llama, r"config\.json: model_type is 'llama', not 'clip'"),
    "missing": (_bad_missing, r"hf: tensor 'text_model\.encoder\.layers\.1\.mlp\.fc2\.bias' is missing "
                              r"\(looked in model\.safetensors\)"),
    "shape": (_bad_shape, r"model\.safetensors: tensor 'vision_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight' "
                          r"has shape \[32, 30\], expected \[32, 32\]"),
    "extra": (_bad_extra, r"model\.safetensors: unexpected tensor.*'vision_model\.encoder\.layers\.2\.mlp\.fc1\.bias'"),
    "no_tokenizer": (_bad_no_tokenizer, r"no tokenizer files"),
    "preprocessor": (_bad_preprocessor, r"preprocessor_config\.json: images come out \(48, 48\).*32x32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(case, hf_clip_dir, tmp_path):
  make, pattern = BAD[case]
  folder = tmp_path / "hf"
  if case == "llama":
    folder.mkdir()
  else:
    shutil.copytree(hf_clip_dir, folder)
  make(folder)
  with pytest.raises(UserError, match=pattern):
    convert_clip.run(argparse.Namespace(hf_dir=str(folder), out=str(tmp_path / "out"), overwrite=False))
  assert not (tmp_path / "out").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]     # no temporary left behind


def test_bad_input_exit_code_via_cli(hf_clip_dir, tmp_path, capsys):
  """Needs `convert-clip` registered in lmfusion_jax/cli.py."""
  folder = tmp_path / "hf"
  shutil.copytree(hf_clip_dir, folder)
  _bad_shape(folder)
  assert main(["convert-clip", "--hf-dir", str(folder), "--out", str(tmp_path / "out")]) == 2
  assert "q_proj.weight" in capsys.readouterr().err


def test_bad_vision_state_dicts(converted):
  cfg, _ = converted
  with pytest.raises(UserError, match="'vision_model.embeddings.patch_embedding.weight' is missing"):
    hf_clip.vision_tower_from_state_dict(cfg.vision, {"text_model.x": np.zeros(1)}, source="llava.safetensors")
  with pytest.raises(UserError, match=r"llava \(vision_config\): model_type is 'llama'"):
    hf_clip.vision_config_from_hf({"model_type": "llava", "vision_config": {"model_type": "llama"}}, "llava")


def test_load_clip_refuses_other_folders(tmp_path, converted_dir):
  (tmp_path / "config.json").write_text(json.dumps({"format": "lmfusion_jax.vae/1"}))
  with pytest.raises(CheckpointError, match="not a converted CLIP checkpoint"):
    hf_clip.load_clip(tmp_path)
  bad = tmp_path / "clip"
  shutil.copytree(converted_dir, bad)
  tensors = safetensors.numpy.load_file(str(bad / "params.safetensors"))
  tensors.pop("vision/layers/fc1")
  safetensors.numpy.save_file(tensors, str(bad / "params.safetensors"))
  with pytest.raises(CheckpointError, match="missing tensor 'vision/layers/fc1'"):
    hf_clip.load_clip(bad)


def test_vision_tower_refuses_wrong_image_size(converted):
  _, model = converted
  assert isinstance(model.vision, VisionTower)
  with pytest.raises(ValueError, match=r"\[batch, 30, 30, 3\], expected \[batch, 32, 32, 3\]"):
    model.vision(jnp.zeros((1, 30, 30, 3)))
