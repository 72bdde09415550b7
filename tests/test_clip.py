"""Flax CLIP / SigLIP vs Hugging Face on tiny random models (float32, tests/clip_models.py): vision towers (every
hidden state, the last one, the pooled output), CLIP text and image embeddings, the vision-tower prefixes LLaVA
checkpoints use, and the CLIP score vs torchmetrics' CLIPScore.

torchmetrics 1.9 predates transformers 5, whose get_image_features / get_text_features return a
BaseModelOutputWithPooling instead of a tensor, so its model is handed over (a documented torchmetrics option:
a callable returning model and processor) behind a wrapper returning `.pooler_output`; everything else
(CLIPProcessor from the folder, the cut to max_position_embeddings, the score) is torchmetrics' own."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfusion_jax.cli import COMMANDS  # noqa: E402
from lmfusion_jax.checkpoints import clip as clip_ckpt  # noqa: E402
from lmfusion_jax.convert import hf_clip  # noqa: E402
from lmfusion_jax.errors import UserError  # noqa: E402
from lmfusion_jax.evaluation.metrics import clip_score as cs  # noqa: E402
from lmfusion_jax.models import clip as clip_lib  # noqa: E402
from lmfusion_jax.sharding import logical_to_spec  # noqa: E402
from clip_models import (MEAN, TOL, converted, converted_dir, hf_clip_dir, image_embeds,  # noqa: E402,F401
                         images_nchw, max_diff, nhwc, randomize, real_looking_uint8, text_embeds, text_fwd,
                         vision_fwd, vision_kw)

assert "convert-clip" in COMMANDS


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model(hf_clip_dir):
  return transformers.CLIPModel.from_pretrained(str(hf_clip_dir)).eval()


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
  legacy = hf_clip.build_module(lambda: clip_lib.CLIP(legacy_cfg, rngs=nnx.Rngs(0)), clip_ckpt.flat_params(model))
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
  pa, pb = clip_ckpt.flat_params(a), clip_ckpt.flat_params(b)
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



def test_preprocessing_matches_clip_processor(hf_clip_dir, converted_dir):
  ckpt = clip_ckpt.load_clip(converted_dir)
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
  score, per_pair = cs.clip_score(clip_ckpt.load_clip(converted_dir), images, CAPTIONS, batch_size=3)
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


