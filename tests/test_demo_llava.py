"""The LLaVAFusion demo (issue 19, item 6): a tiny LLaVA pretrained here, written as a LLaVA checkpoint, exported
to Hugging Face and converted back, then LLaVAFusion training; the `:ci` variant end to end through the CLI."""
import io
import json
import os
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

from lmfusion_jax import cli
from lmfusion_jax.errors import UserError


def test_caption_rows_put_the_loss_on_the_caption_and_eos_only():
  from lmfusion_jax.training.llava_pretrain import caption_rows
  rows = caption_rows([[40, 41, 42], [50]], num_image_tokens=4, image_token=9, bos=1, eos=2, pad=0, seq_len=12)
  assert rows["tokens"][0].tolist() == [1, 9, 9, 9, 9, 40, 41, 42, 2, 0, 0, 0]
  assert rows["segment_ids"][1].tolist() == [1] * 7 + [0] * 5
  for r, want in ((0, [40, 41, 42, 2]), (1, [50, 2])):
    m = rows["loss_mask"][r].astype(bool)
    assert rows["targets"][r][m].tolist() == want              # predicted from the last image token on
    assert np.nonzero(m)[0][0] == 4
  with pytest.raises(Exception, match="seq_len"):
    caption_rows([[5] * 8], num_image_tokens=4, image_token=9, bos=1, eos=2, pad=0, seq_len=12)


def _tiny_llava(image_token=60):
  from lmfusion_jax.models.clip import ImageProcessorConfig
  from lmfusion_jax.models.config import LlamaConfig
  from lmfusion_jax.models.llava import LlavaConfig
  from lmfusion_jax.models.vision_tower import VisionConfig
  text = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64,
                     rope_theta=10000.0, max_seq_len=64, bos_id=1, eos_id=2)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=8, patch_size=2)
  proc = ImageProcessorConfig(shortest_edge=8, crop_hw=(8, 8), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  return LlavaConfig(text=text, vision=vision, processor=proc, vision_feature_layer=-1, image_token_index=image_token)


def test_save_llava_exports_and_converts_back_bitwise_with_all_zero_leaves(tmp_path):
  """A fresh VLM (its biases exactly zero: chunks equal to the fill value) -> save_llava -> export_llava ->
  convert_llava: the same vision and text leaves, and the config read back as written."""
  from flax import nnx
  from lmfusion_jax.checkpoints import llava as llava_ckpt
  from lmfusion_jax.checkpoints import params as params_io
  from lmfusion_jax.convert.llava_checkpoint import convert_llava, export_llava, save_llava
  from lmfusion_jax.models.llama import Llama
  from lmfusion_jax.training.llava_pretrain import init_vision
  cfg = _tiny_llava()
  params = {"text": nnx.to_pure_dict(nnx.state(Llama(cfg.text, rngs=nnx.Rngs(0)), nnx.Param)),
            "vision": init_vision(cfg, 0)}
  assert not np.any(np.asarray(params["vision"]["tower"]["post_norm"]["bias"]))
  save_llava(str(tmp_path / "vlm"), cfg, params)
  export_llava(str(tmp_path / "vlm"), str(tmp_path / "hf"))
  convert_llava(str(tmp_path / "hf"), str(tmp_path / "back"))
  back = llava_ckpt.read_llava(str(tmp_path / "back"))
  assert back.replace(hf_layout="saved") == cfg.replace(hf_layout="saved")
  for part in ("text", "vision"):
    got = params_io.load_params(str(tmp_path / "back"), subtree=part)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params[part]), strict=True):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_demo_llava_config_is_consistent():
  from lmfusion_jax.demo_llava import llava_config
  from lmfusion_jax.models.config import llama_config_from
  from lmfusion_jax.run_config import load_config, model_configs, validate_run_config
  for arg in ("", ":ci"):
    cfg = load_config("configs/demo_llava_digits.py" + arg)
    validate_run_config(cfg)
    _, fcfg, _ = model_configs(cfg)
    assert fcfg.tokens_per_image == cfg.data.tokens_per_image and cfg.data.dataset == "digits"
    lcfg = llava_config(cfg, llama_config_from(cfg.model), image_token=400)
    assert 1 + lcfg.tokens_per_tile + 8 + 1 <= cfg.demo.llava.seq_len       # BOS, image, longest caption, EOS
  with pytest.raises(UserError, match="unknown variant"):
    load_config("configs/demo_llava_digits.py:nope")


@pytest.mark.slow
def test_ci_sized_llava_demo_keeps_understanding_bit_identical(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  monkeypatch.chdir(tmp_path)                    # relative workdir, config found from another directory
  buf = io.StringIO()
  with redirect_stdout(buf):
    rc = cli.main(["demo", "--workdir", "w", "--config", "configs/demo_llava_digits.py:ci", "--json"])
  assert rc == 0
  work = tmp_path / "w"
  printed = json.loads(buf.getvalue().strip().splitlines()[-1])
  stored = json.loads((work / "metrics.json").read_text())
  m = stored["metrics"]
  assert printed["generation_accuracy"] == m["generation_accuracy"]
  # the LLaVAFusion invariants: the VLM's understanding outputs and its text side unchanged to the bit
  assert m["understanding_images"] == 20 and m["understanding_identical"] == 20
  assert m["understanding_unchanged"] is True and m["understanding_logits_unchanged"] is True
  assert m["text_nll_unchanged"] is True and m["text_nll"] == m["text_nll_base"]
  # HF transformers loads the exported VLM and agrees with ours
  assert m["hf_loads"] is True and m["hf_logits_max_abs_diff"] <= 1e-4 and m["hf_pixels_max_abs_diff"] == 0.0
  for k in ("generation_accuracy", "vlm_caption_accuracy", "caption_accuracy", "diffusion_loss_mean", "text_nll"):
    assert np.isfinite(m[k]) and m[k] >= 0, k
  assert set(stored["timings_s"]) == {"dataset + tokenizer", "text LM pretraining", "LLaVA pretraining",
                                      "HF export + check + convert-llava", "LLaVAFusion training", "evaluation",
                                      "understanding check", "sample grid"}
  report = (work / "report.md").read_text()
  for field in ("generation accuracy", "VLM captioning accuracy", "20 / 20", "unchanged to the bit (tokens and "
                "logits) | True", "text NLL unchanged to the last bit | True", "samples_grid.png"):
    assert field in report, field
  hf = json.loads((work / "hf_vlm" / "config.json").read_text())
  assert hf["model_type"] == "llava" and hf["vision_config"]["model_type"] == "clip_vision_model"
  assert os.path.exists(work / "hf_vlm" / "preprocessor_config.json")
  for sub in ("tokenizer_llava", "base_lm", "vlm/lmfusion.json", "converted/lmfusion.json", "llavafusion",
              "samples_grid.png"):
    assert (work / sub).exists(), sub
