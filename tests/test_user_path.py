"""The README's user path at toy scale, through the CLI, with relative paths, from two directories (issue 15):

  convert-llama (a HF Llama folder with its tokenizer) -> build-data (images + captions.jsonl, a VAE) ->
  train (model and tokenizer from init_from; sampling defaults recorded) -> from ANOTHER directory: sample,
  caption, eval, generate, export-llama on the training workdir.

And `lmfusion-jax train --config configs/tiny.py --config.workdir=run` with no data or tokenizer flag."""
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

from hf_models import make_hf_llama
from lmfusion_jax import cli


def run_cli(capsys, *argv) -> str:
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 0, f"{argv}: exit {code}\n{out}\n{err}"
  return out


def make_images(folder, n=16):
  """Coloured squares (PNG) and their captions."""
  from PIL import Image
  os.makedirs(folder)
  colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    for i in range(n):
      name, rgb = list(colours.items())[i % 4]
      img = np.full((12, 12, 3), rgb, np.uint8)
      img[i % 5:i % 5 + 4, 2:6] = 255
      Image.fromarray(img).save(os.path.join(folder, f"img{i}.png"))
      f.write(json.dumps({"file": f"img{i}.png", "caption": f"a {name} square"}) + "\n")


@pytest.mark.slow
def test_the_readme_user_path_runs_with_relative_paths_from_two_directories(tmp_path, monkeypatch, capsys,
                                                                            tokenizer_dir):
  from flax import nnx
  from lmfusion_jax.checkpoints.vae import save_vae
  from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig
  work, other = tmp_path / "work", tmp_path / "elsewhere"
  work.mkdir()
  other.mkdir()
  monkeypatch.chdir(work)
  # The user's inputs: a HF Llama folder (weights + tokenizer), a VAE, images with captions.
  make_hf_llama("hf", vocab_size=400)
  for f in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, f), "hf")
  vae_cfg = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
  save_vae(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), vae_cfg, "vae")
  make_images("images")

  out = run_cli(capsys, "convert-llama", "--hf-dir", "hf", "--out", "ckpt", "--latent-size", "4",
                "--latent-channels", "4", "--image-io", "linear")   # linear patchify: a toy compiles faster
  vocab = json.load(open("hf/tokenizer.json"))["model"]["vocab"]
  assert f"BOI/EOI ids {vocab['<|reserved_special_token_0|>']}/{vocab['<|reserved_special_token_1|>']}" in out
  assert os.path.exists("ckpt/tokenizer/tokenizer.json"), "the tokenizer travels with the checkpoint"
  out = run_cli(capsys, "build-data", "image-captions", "--source", "images", "--vae", "vae", "--data-dir", "tfds",
                "--image-size", "8", "--test-size", "4")
  run_cli(capsys, "train", "--config", "configs/tiny.py", "--config.workdir=run", "--config.init_from=ckpt",
          "--config.model.preset=init", "--config.data.dataset=image_captions", "--config.data.data_dir=tfds",
          "--config.data.image_size=8", "--config.total_steps=4", "--config.save_every=2", "--config.log_every=1",
          "--config.sampling.sampler=ddim", "--config.sampling.steps=3", "--config.sampling.cfg_scale=2.0")
  record = json.load(open("run/run_config.json"))
  assert record["config"]["data"]["tokenizer_dir"] == str(work / "ckpt" / "tokenizer")
  assert [json.loads(x)["step"] for x in open("run/metrics.jsonl")] == [1, 2, 3, 4]
  assert os.listdir("run/tb"), "TensorBoard events"

  monkeypatch.chdir(other)   # everything below names the run relatively, from elsewhere
  out = run_cli(capsys, "sample", "--checkpoint", "../work/run", "--prompt", "a red square", "--num", "2",
                "--vae", "../work/vae", "--out", "samples")
  assert "(ddim, 3 steps, cfg 2.0, seed 0)" in out, "the run's recorded sampling defaults"
  assert sorted(os.listdir("samples"))[:2] == ["contact_sheet.png", "prompts.json"]
  out = run_cli(capsys, "caption", "--checkpoint", "../work/run/checkpoints/4", "--image", "../work/images/img0.png",
                "--vae", "../work/vae", "--max-new-tokens", "3", "--json")
  assert json.loads(out.splitlines()[0])["image"] == "../work/images/img0.png"
  out = run_cli(capsys, "eval", "--checkpoint", "../work/run", "--output", "results/eval.json",
                "--config.eval.evaluators=('text_nll', 'diffusion_loss')", "--config.eval.num_examples=4")
  assert json.load(open("results/eval.json"))["text_nll"] == json.loads(out)["text_nll"]
  out = run_cli(capsys, "generate", "--checkpoint", "../work/run", "--prompt", "a red", "--max-new-tokens", "3",
                "--json")
  assert len(json.loads(out)["tokens"]) <= 3
  run_cli(capsys, "export-llama", "--checkpoint", "../work/run", "--out", "hf_again")
  assert os.path.exists("hf_again/tokenizer.json")
  # The text branch stayed the Llama: the export equals what went in, tensor by tensor.
  before = safetensors.numpy.load_file("../work/hf/model.safetensors")
  after = safetensors.numpy.load_file("hf_again/model.safetensors")
  assert sorted(before) == sorted(after)
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)


@pytest.mark.slow
def test_tiny_trains_with_no_data_or_tokenizer_flag(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("LMFUSION_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  out = run_cli(capsys, "train", "--config", "configs/tiny.py", "--config.workdir=run", "--config.total_steps=2")
  assert "data.data_dir: using the digits dataset in" in out and "step 2/2" in out
  record = json.load(open("run/run_config.json"))["config"]["data"]
  assert record["data_dir"].startswith(str(tmp_path / "cache"))
  assert record["tokenizer_dir"].startswith(str(tmp_path / "cache"))
