"""convert-llava / export-llava on tiny random HF LLaVA and LLaVA-NeXT folders: the checkpoint's three parts
(text, vision, image = copies of the text layers), the folder written back bit for bit (names, dtypes, bytes, the
config files), understanding from the converted checkpoint = HF generate, LMFusion training's init loads it, and
bad input named with nothing left behind. Commands run from another directory with relative paths, as users do."""
import glob
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clip_models import real_looking_uint8  # noqa: E402
from llava_models import IMAGE_TOKEN, make_hf_llava  # noqa: E402
from lmfusion_jax import cli  # noqa: E402
from lmfusion_jax.checkpoints import params as params_io  # noqa: E402
from lmfusion_jax.checkpoints.files import CheckpointError  # noqa: E402
from lmfusion_jax.convert.hf_llama import ConversionError  # noqa: E402
from lmfusion_jax.inference import llava_generate as gen  # noqa: E402
from lmfusion_jax.inference import llava_preprocess as pre  # noqa: E402

IMAGE_FLAGS = ["--boi-id", "3", "--eoi-id", "4", "--image-io", "linear", "--latent-size", "4",
               "--latent-channels", "2"]


def run_cli(cwd, *argv):
  old = os.getcwd()
  os.chdir(cwd)
  try:
    return cli.main([str(a) for a in argv])
  finally:
    os.chdir(old)


def tensors(folder):
  out = {}
  for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    out.update(safetensors.numpy.load_file(f))
  return out


@pytest.fixture(scope="module", params=["llava-clip", "next-siglip"])
def converted(request, tmp_path_factory):
  """(variant, work dir, torch model): HF folder `hf`, checkpoint `ck` written by the CLI from `work`."""
  work = tmp_path_factory.mktemp("llava_convert")
  hf = make_hf_llava(work / "hf", request.param)
  assert run_cli(work, "convert-llava", "--hf-dir", "hf", "--out", "ck", *IMAGE_FLAGS) == 0
  return request.param, work, hf


def test_checkpoint_has_text_vision_and_image_copies(converted):
  _, work, _ = converted
  ck = str(work / "ck")
  assert sorted(params_io.stored_metadata(ck)) == ["image", "text", "vision"]
  text = params_io.load_params(ck, subtree="text/layers")
  image = params_io.load_params(ck, subtree="image/layers")
  from lmfusion_jax.models.decoder import IMAGE_LAYER_KEYS
  assert set(image) == set(IMAGE_LAYER_KEYS["deep"]) and set(image) <= set(text)
  for k in image:                                            # LMFusion init: exact copies
    assert np.array_equal(np.asarray(image[k]), np.asarray(text[k])), k
  hf_t = tensors(work / "hf")
  ours = np.asarray(params_io.load_params(ck, subtree="text/embed"))
  assert np.array_equal(ours, hf_t["language_model.model.embed_tokens.weight"])


def test_export_llava_writes_the_folder_back_bit_for_bit(converted):
  _, work, _ = converted
  assert run_cli(work, "export-llava", "--checkpoint", "ck", "--out", "back") == 0
  a, b = tensors(work / "hf"), tensors(work / "back")
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name
  for f in ("config.json", "preprocessor_config.json", "generation_config.json"):
    assert (work / "back" / f).read_bytes() == (work / "hf" / f).read_bytes(), f
  cls = transformers.AutoModelForImageTextToText
  again = cls.from_pretrained(str(work / "back")).eval()        # HF loads what we wrote
  assert type(again).__name__.startswith("Llava")


def test_understanding_from_the_checkpoint_equals_hf_generate(converted):
  _, work, hf = converted
  llava = gen.load_llava(str(work / "ck"))
  image = real_looking_uint8(11, 23, 40)
  pixels = [pre.preprocess(llava.cfg, image)]
  rng = np.random.default_rng(4)
  prompt = pre.expand_image_tokens([1] + rng.integers(3, IMAGE_TOKEN - 1, 4).tolist() + [IMAGE_TOKEN, 9, 8],
                                   llava.cfg, [p.num_tokens for p in pixels])
  out = transformers.AutoImageProcessor.from_pretrained(str(work / "hf"))(images=[image], return_tensors="np")
  kw = {"pixel_values": torch.tensor(out["pixel_values"])}
  if "image_sizes" in out:
    kw["image_sizes"] = torch.tensor(out["image_sizes"])
  with torch.no_grad():
    theirs = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                         **kw)[0, len(prompt):].tolist()
  assert gen.generate(llava, pixels, [prompt], 32, eos_ids=())[0] == theirs


def test_lmfusion_training_init_reads_text_and_image_only(converted):
  import jax
  from jax.sharding import Mesh
  from lmfusion_jax.models import sharded
  _, work, _ = converted
  ck = str(work / "ck")
  llama, fusion = params_io.read_model_config(ck)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  got = params_io.load_params(ck, mesh=mesh, shardings=sharded.model_shardings(llama, fusion, mesh))
  assert sorted(got) == ["image", "text"]


def test_bf16_folder_round_trips_in_bf16(tmp_path):
  hf = make_hf_llava(tmp_path / "hf32", "llava-clip", seed=3)
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
  shutil.copy(tmp_path / "hf32" / "preprocessor_config.json", tmp_path / "hf")
  assert run_cli(tmp_path, "convert-llava", "--hf-dir", "hf", "--out", "ck", "--text-only") == 0
  assert sorted(params_io.stored_metadata(str(tmp_path / "ck"))) == ["text", "vision"]
  assert run_cli(tmp_path, "export-llava", "--checkpoint", "ck", "--out", "back") == 0
  a, b = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
  assert sorted(a) == sorted(b) and all(str(b[n].dtype) == "bfloat16" and a[n].tobytes() == b[n].tobytes() for n in a)


def test_bad_inputs_are_named_and_leave_nothing(converted, tmp_path, capsys):
  _, work, _ = converted
  # a tensor of the wrong shape: the error names it and the file; no checkpoint, no temporary folder
  shutil.copytree(work / "hf", tmp_path / "bad")
  t = tensors(tmp_path / "bad")
  name = next(n for n in t if n.endswith("multi_modal_projector.linear_1.weight"))
  t[name] = t[name][:-1]
  os.remove(tmp_path / "bad" / "model.safetensors")
  safetensors.numpy.save_file(t, str(tmp_path / "bad" / "model.safetensors"))
  assert run_cli(tmp_path, "convert-llava", "--hf-dir", "bad", "--out", "ck", *IMAGE_FLAGS) != 0
  err = capsys.readouterr().err
  assert name in err and "model.safetensors" in err
  assert os.listdir(tmp_path) == ["bad"]
  # export-llava of a plain LMFusion (not LLaVA) checkpoint, and into an existing folder
  with pytest.raises(CheckpointError, match="convert-llava"):
    from lmfusion_jax.convert.llava_checkpoint import export_llava
    plain = tmp_path / "plain"
    llama, _ = params_io.read_model_config(str(work / "ck"))
    params_io.save_params(str(plain), {"text": params_io.load_params(str(work / "ck"), subtree="text")}, llama)
    export_llava(str(plain), str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  assert run_cli(work, "export-llava", "--checkpoint", "ck", "--out", "hf") != 0
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(ConversionError, match="model_type"):
    (tmp_path / "cfg").mkdir()
    shutil.copy(work / "hf" / "config.json", tmp_path / "cfg")
    text = (tmp_path / "cfg" / "config.json").read_text().replace('"model_type": "llava', '"model_type": "xllava')
    (tmp_path / "cfg" / "config.json").write_text(text)
    from lmfusion_jax.convert.hf_llava import read_llava_config
    read_llava_config(tmp_path / "cfg")


@pytest.fixture(scope="module", params=["llava-clip", "llava-siglip", "next-clip", "next-siglip"])
def with_tokenizer(request, tmp_path_factory):
  from llava_models import make_hf_llava_with_tokenizer
  work = tmp_path_factory.mktemp("llava_cli")
  hf, tok = make_hf_llava_with_tokenizer(work / "hf", request.param)
  assert run_cli(work, "convert-llava", "--hf-dir", "hf", "--out", "ck", *IMAGE_FLAGS) == 0
  from PIL import Image
  Image.fromarray(real_looking_uint8(2, 30, 52)).save(work / "photo.png")
  return request.param, work, hf, tok


def hf_reference(variant, work, hf, tok, prompt):
  """HF's own pipeline: its processor expands <image> and makes pixel_values, then generate (32 greedy tokens)."""
  from PIL import Image
  image_processor = transformers.AutoImageProcessor.from_pretrained(str(work / "hf"))
  cls = transformers.LlavaNextProcessor if variant.startswith("next") else transformers.LlavaProcessor
  proc = cls(image_processor=image_processor, tokenizer=tok, patch_size=hf.config.vision_config.patch_size,
             vision_feature_select_strategy=hf.config.vision_feature_select_strategy, image_token="<image>",
             num_additional_image_tokens=1 if variant.endswith("clip") else 0)      # CLIP's CLS; SigLIP has none
  inputs = proc(text=[prompt], images=[Image.open(work / "photo.png").convert("RGB")], return_tensors="pt")
  with torch.no_grad():
    out = hf.generate(**inputs, do_sample=False, max_new_tokens=32, min_new_tokens=32)
  return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_and_caption_cli_equal_hf_pipeline(with_tokenizer, capsys):
  import json
  variant, work, hf, tok = with_tokenizer
  prompt = "USER: <image>\nwhat is in the image ASSISTANT:"
  want = hf_reference(variant, work, hf, tok, prompt)
  for ck in ("ck", "hf"):                      # the converted checkpoint and the HF folder itself
    assert run_cli(work, "generate", "--checkpoint", ck, "--image", "photo.png", "--prompt", prompt,
                   "--max-new-tokens", "32", "--ignore-eos", "--json") == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == want, ck
  assert run_cli(work, "caption", "--checkpoint", "ck", "--image", "photo.png", "--prompt", prompt,
                 "--max-new-tokens", "8", "--json") == 0
  cap = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert cap["tokens"] == want[:len(cap["tokens"])] and cap["image"] == "photo.png"
  # several images are captioned as one batch: each as it is alone (another size: another NeXT grid)
  from PIL import Image
  Image.fromarray(real_looking_uint8(3, 44, 17)).save(work / "tall.png")
  assert run_cli(work, "caption", "--checkpoint", "ck", "--image", "tall.png", "--prompt", prompt,
                 "--max-new-tokens", "8", "--json") == 0
  alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert run_cli(work, "caption", "--checkpoint", "ck", "--image", "photo.png", "--image", "tall.png", "--prompt",
                 prompt, "--max-new-tokens", "8", "--json") == 0
  both = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
  assert [b["tokens"] for b in both] == [cap["tokens"], alone["tokens"]]
  # a prompt without <image> is refused with both counts
  assert run_cli(work, "generate", "--checkpoint", "ck", "--image", "photo.png", "--prompt", "no image here") != 0
  assert "0 image token(s)" in capsys.readouterr().err
