"""`convert-clip` and the converted CLIP folder: from another directory with relative paths, a bit-exact round
trip, and bad inputs (a Llama folder, a missing / wrongly shaped / unexpected tensor, no tokenizer, a preprocessor
that does not fit the model) named in one line with exit code 2."""
import argparse
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfusion_jax.checkpoints.files import CheckpointError  # noqa: E402
from lmfusion_jax.cli import COMMANDS, main  # noqa: E402
from lmfusion_jax.commands import convert_clip  # noqa: E402
from lmfusion_jax.checkpoints import clip as clip_ckpt  # noqa: E402
from lmfusion_jax.convert import hf_clip  # noqa: E402
from lmfusion_jax.errors import UserError  # noqa: E402
from lmfusion_jax.models.vision_tower import VisionTower  # noqa: E402
from clip_models import converted, converted_dir, hf_clip_dir  # noqa: E402,F401

assert "convert-clip" in COMMANDS


# --- fixtures -----------------------------------------------------------------------------------------------

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
  ckpt = clip_ckpt.load_clip("out/clip")
  assert ckpt.config == converted[0]
  for k, v in clip_ckpt.flat_params(converted[1]).items():
    assert np.array_equal(np.asarray(clip_ckpt.flat_params(ckpt.model)[k]), np.asarray(v)), k
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
  assert clip_ckpt.load_clip(tmp_path / "run" / "clip").config.projection_dim == 24
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
    clip_ckpt.load_clip(tmp_path)
  bad = tmp_path / "clip"
  shutil.copytree(converted_dir, bad)
  tensors = safetensors.numpy.load_file(str(bad / "params.safetensors"))
  tensors.pop("vision/layers/fc1")
  safetensors.numpy.save_file(tensors, str(bad / "params.safetensors"))
  with pytest.raises(CheckpointError, match="missing tensor 'vision/layers/fc1'"):
    clip_ckpt.load_clip(bad)


def test_vision_tower_refuses_wrong_image_size(converted):
  _, model = converted
  assert isinstance(model.vision, VisionTower)
  with pytest.raises(ValueError, match=r"\[batch, 30, 30, 3\], expected \[batch, 32, 32, 3\]"):
    model.vision(jnp.zeros((1, 30, 30, 3)))

