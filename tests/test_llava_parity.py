"""LLaVA / LLaVA-NeXT understanding against Hugging Face transformers on tiny random models (CLIP and SigLIP towers):
the image processor's pixel_values, the image features (after projector / NeXT packing), the logits of a prompt with
images, 32 greedy tokens; both tensor-name spellings; bad folders and prompts named in the error."""
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clip_models import max_diff, real_looking_uint8  # noqa: E402
from llava_models import IMAGE_TOKEN, VARIANTS, make_hf_llava  # noqa: E402
from lmfusion_jax.convert import hf_llama, hf_llava  # noqa: E402
from lmfusion_jax.convert.hf_llama import ConversionError  # noqa: E402
from lmfusion_jax.errors import UserError  # noqa: E402
from lmfusion_jax.inference import llava_generate as gen  # noqa: E402
from lmfusion_jax.inference import llava_preprocess as pre  # noqa: E402
from lmfusion_jax.models import llava as llava_lib  # noqa: E402

TOL = 1e-4
# (height, width): wide, tall, square, and one that picks a 3-tile NeXT pinpoint
SIZES = [(23, 40), (37, 21), (16, 16), (13, 44)]


@pytest.fixture(scope="session", params=VARIANTS)
def case(request, tmp_path_factory):
  """(variant, HF folder, torch model, our Llava, HF image processor) built once per variant."""
  folder = tmp_path_factory.mktemp("llava") / request.param
  hf = make_hf_llava(folder, request.param)
  proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
  return request.param, folder, hf, gen.load_llava(folder), proc


def _images(n, seed=0):
  return [real_looking_uint8(seed + i, *SIZES[i % len(SIZES)]) for i in range(n)]


def _hf_pixels(case, images):
  """HF processor output as the model's kwargs (torch tensors)."""
  variant, _, _, _, proc = case
  out = proc(images=images, return_tensors="np")
  kw = {"pixel_values": torch.tensor(out["pixel_values"])}
  if variant.startswith("next"):
    kw["image_sizes"] = torch.tensor(out["image_sizes"])
  return kw


def _prompt(llava, pixels, seed=0, text=(5, 7)):
  """BOS, text, one image token per image spread between text runs, expanded as the processor does."""
  rng = np.random.default_rng(seed)
  ids = [1]
  for _ in pixels:
    ids += rng.integers(3, IMAGE_TOKEN - 1, text[0]).tolist() + [IMAGE_TOKEN]
  ids += rng.integers(3, IMAGE_TOKEN - 1, text[1]).tolist()
  return pre.expand_image_tokens(ids, llava.cfg, [p.num_tokens for p in pixels])


def test_config_and_layout(case):
  variant, folder, hf, llava, _ = case
  cfg = llava.cfg
  assert cfg.hf_layout == "saved" and cfg.is_next == variant.startswith("next")
  assert cfg.vision.variant == variant.split("-")[1] and cfg.image_token_index == IMAGE_TOKEN
  assert cfg.vision_feature_layer == -2 and cfg.projector_hidden_act == "gelu"
  # the rules name every tensor of the folder ("saved"), and of the torch module ("module"), nothing else
  assert _rule_names(cfg) == set(safetensors.numpy.load_file(str(folder / "model.safetensors")))
  assert _rule_names(cfg.replace(hf_layout="module")) == set(hf.state_dict())


def _rule_names(cfg):
  names = {n for r in hf_llava.text_rules(cfg) for n in hf_llama.hf_names(r, cfg.text)}
  return names | {n for r in hf_llava.vision_rules(cfg) for n in r.hf_names("")}


def test_preprocessing_matches_hf(case):
  _, _, _, llava, proc = case
  for image in _images(len(SIZES)):
    ours = pre.preprocess(llava.cfg, image)
    theirs = proc(images=image, return_tensors="np")["pixel_values"]
    theirs = theirs[0] if llava.cfg.is_next else theirs
    assert ours.tiles.shape == theirs.transpose(0, 2, 3, 1).shape
    assert max_diff(ours.tiles, theirs.transpose(0, 2, 3, 1)) <= 1e-5, image.shape
    assert ours.image_hw == image.shape[:2]
  # a half-transparent RGBA image: HF composites it onto white before anything else, so do we
  from PIL import Image
  rgb = _images(1, seed=9)[0]
  alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
  rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
  theirs = proc(images=rgba, return_tensors="np")["pixel_values"]
  theirs = (theirs[0] if llava.cfg.is_next else theirs).transpose(0, 2, 3, 1)
  assert max_diff(pre.preprocess(llava.cfg, rgba).tiles, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["llava-clip"], indirect=True)
def test_llava_image_processor_pad_to_square(case):
  _, _, _, llava, _ = case
  hf_proc = transformers.LlavaImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                             do_pad=True, image_mean=(0.5, 0.45, 0.4), image_std=(0.25, 0.3, 0.28))
  d = hf_proc.to_dict()
  cfg = hf_llava.processor_from_hf(json.loads(json.dumps(d)), llava.cfg, "preprocessor_config.json")
  assert cfg.pad_to_square
  for image in _images(3):
    theirs = hf_proc(images=image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert max_diff(pre.preprocess(cfg, image).tiles, theirs) <= 1e-5


def test_image_features_match_hf(case):
  _, _, hf, llava, _ = case
  images = _images(len(SIZES))
  ours = np.asarray(gen.images_rows(llava.vision, [pre.preprocess(llava.cfg, im) for im in images]))
  with torch.no_grad():
    theirs = torch.cat(list(hf.model.get_image_features(**_hf_pixels(case, images)).pooler_output)).numpy()
  assert ours.shape == theirs.shape
  assert max_diff(ours, theirs) <= TOL


def test_num_image_tokens_is_what_hf_packs(case):
  _, _, hf, llava, _ = case
  images = _images(len(SIZES))
  with torch.no_grad():
    rows = [x.shape[0] for x in hf.model.get_image_features(**_hf_pixels(case, images)).pooler_output]
  assert [pre.preprocess(llava.cfg, im).num_tokens for im in images] == rows


def test_logits_match_hf(case):
  _, _, hf, llava, _ = case
  images = _images(2, seed=3)
  pixels = [pre.preprocess(llava.cfg, im) for im in images]
  prompt = _prompt(llava, pixels)
  ours = np.asarray(gen.prompt_logits(llava, pixels, [prompt]))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor([prompt]), **_hf_pixels(case, images)).logits.numpy()
  assert np.abs(theirs).max() > 1.0                       # O(1) logits: the tolerance means something
  assert max_diff(ours, theirs) <= TOL


def test_greedy_32_tokens_match_hf_generate(case):
  _, _, hf, llava, _ = case
  images = _images(1, seed=5)
  pixels = [pre.preprocess(llava.cfg, im) for im in images]
  prompt = _prompt(llava, pixels, seed=1)
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      **_hf_pixels(case, images))
  theirs = out[0, len(prompt):].tolist()
  ours = gen.generate(llava, pixels, [prompt], 32, eos_ids=())[0]
  assert len(theirs) == 32 and ours == theirs


@pytest.mark.parametrize("case", ["next-clip"], indirect=True)
def test_batched_generation_equals_each_prompt_alone(case):
  _, _, _, llava, _ = case
  images = _images(2, seed=7)
  pixels = [pre.preprocess(llava.cfg, im) for im in images]
  prompts = [_prompt(llava, pixels[:1], seed=2, text=(3, 4)), _prompt(llava, pixels[1:], seed=3, text=(9, 2))]
  assert len(prompts[0]) != len(prompts[1])
  batch = gen.generate(llava, pixels, prompts, 8, eos_ids=())
  alone = [gen.generate(llava, [p], [q], 8, eos_ids=())[0] for p, q in zip(pixels, prompts)]
  assert batch == alone


@pytest.mark.parametrize("case", ["llava-siglip"], indirect=True)
def test_without_images_it_is_the_llama(case):
  from lmfusion_jax.inference import text
  _, _, _, llava, _ = case
  prompt = [1, 5, 9, 4, 7]
  assert gen.generate(llava, [], [prompt], 8, eos_ids=()) == text.generate(llava.text, [prompt], 8, eos_ids=())


# --- both spellings of the tensor names ---------------------------------------------------------------------

def _rewrite(folder, change):
  path = folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(path))
  out = change(tensors)
  tensors = out if isinstance(out, dict) else tensors
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _to_module_names(tensors):
  """"saved" names -> transformers 5's module names, with the tower under vision_model. (older hub style)."""
  def rename(n):
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")):
      if n.startswith(old):
        return new + n[len(old):]
    raise AssertionError(n)
  return {rename(n): v for n, v in tensors.items()}


@pytest.mark.parametrize("case", ["next-siglip"], indirect=True)
def test_module_spelling_reads_the_same(case, tmp_path):
  _, folder, _, llava, _ = case
  shutil.copytree(folder, tmp_path / "hf")
  _rewrite(tmp_path / "hf", _to_module_names)
  cfg, text, vision = hf_llava.load_hf_llava(tmp_path / "hf")
  assert cfg.hf_layout == "module+vision_model" and cfg.replace(hf_layout="saved") == llava.cfg
  same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
  assert all(jax.tree.leaves(jax.tree.map(same, text, _pure(llava.text))))
  assert all(jax.tree.leaves(jax.tree.map(same, _pure(vision), _pure(llava.vision))))


def _pure(module):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


# --- bad input ----------------------------------------------------------------------------------------------

BAD = {
    "missing": (lambda t: t.pop("vision_tower.encoder.layers.1.mlp.fc2.bias"),
                r"hf: tensor 'vision_tower\.encoder\.layers\.1\.mlp\.fc2\.bias' is missing \(looked in "
                r"model\.safetensors\)"),
    "missing_text": (lambda t: t.pop("language_model.model.layers.0.mlp.up_proj.weight"),
                     r"tensor 'language_model\.model\.layers\.0\.mlp\.up_proj\.weight' is missing \(looked in "
                     r"model\.safetensors\)"),
    "shape": (lambda t: t.update({"multi_modal_projector.linear_2.weight": np.zeros((32, 31), np.float32)}),
              r"model\.safetensors: tensor 'multi_modal_projector\.linear_2\.weight' has shape \[32, 31\], "
              r"expected \[32, 32\]"),
    "text_shape": (lambda t: t.update({"language_model.model.layers.1.self_attn.k_proj.weight":
                                       np.zeros((8, 32), np.float32)}),
                   r"model\.safetensors: tensor 'language_model\.model\.layers\.1\.self_attn\.k_proj\.weight' has "
                   r"shape \[8, 32\], but config\.json implies \[16, 32\]"),
    "extra": (lambda t: t.update({"vision_tower.encoder.layers.2.mlp.fc1.bias": np.zeros((64,), np.float32)}),
              r"model\.safetensors: unexpected tensor.*'vision_tower\.encoder\.layers\.2\.mlp\.fc1\.bias'"),
}


@pytest.mark.parametrize("case", ["llava-clip"], indirect=True)
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_folder_names_tensor_and_file(bad, case, tmp_path):
  _, folder, _, _, _ = case
  change, pattern = BAD[bad]
  shutil.copytree(folder, tmp_path / "hf")
  _rewrite(tmp_path / "hf", change)
  with pytest.raises(ConversionError, match=pattern):
    hf_llava.load_hf_llava(tmp_path / "hf")


@pytest.mark.parametrize("case", ["next-clip"], indirect=True)
def test_bad_config_fields(case, tmp_path):
  _, folder, _, _, _ = case
  shutil.copytree(folder, tmp_path / "hf")
  path = tmp_path / "hf" / "config.json"
  good = json.loads(path.read_text())
  for field, value, pattern in (("vision_feature_layer", [-2, -1], r"config\.json: field 'vision_feature_layer'="
                                                                   r"\[-2, -1\]: only a single layer"),
                                ("vision_feature_layer", 5, r"vision_feature_layer=5: the tower has 3 hidden states"),
                                ("vision_feature_select_strategy", "full", r"vision_feature_select_strategy='full'"),
                                ("image_grid_pinpoints", [[16, 20]], r"image_grid_pinpoints: \[16, 20\]"),
                                ("model_type", "llama", r"model_type is 'llama'")):
    path.write_text(json.dumps({**good, field: value}))
    with pytest.raises(ConversionError, match=pattern):
      hf_llava.load_hf_llava(tmp_path / "hf")


@pytest.mark.parametrize("case", ["llava-clip"], indirect=True)
def test_wrong_image_token_count_names_both_counts(case):
  _, _, _, llava, _ = case
  pixels = [pre.preprocess(llava.cfg, im) for im in _images(1)]
  prompt = _prompt(llava, pixels)
  first = prompt.index(IMAGE_TOKEN)
  short = prompt[:first] + prompt[first + 1:]                         # one image token fewer
  with pytest.raises(UserError, match=r"hold 15 image token\(s\) \(id 95\) but the image\(s\) give 16 feature"):
    gen.generate(llava, pixels, [short], 4)
  with pytest.raises(UserError, match=r"the prompt holds 0 image token\(s\) \(id 95\) for 1 image\(s\)"):
    pre.expand_image_tokens([1, 2, 3], llava.cfg, [16])
  rows = np.zeros((16, llava.cfg.text.dim), np.float32)
  with pytest.raises(UserError, match=r"hold 15 image token.*give 16 feature row"):
    llava_lib.place_image_features(np.zeros((1, len(short), llava.cfg.text.dim)), np.asarray([short]), rows,
                                   IMAGE_TOKEN)
