"""The built-in demo (issue 6): a CI-sized run end to end, and the text LM's image-marker documents."""
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
from PIL import Image

from lmfusion_jax import cli, demo


def test_placeholder_documents_mark_an_image_before_or_after_the_text(tokenizer_dir):
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  tok = load_tokenizer(tokenizer_dir)
  sp = special_ids(tok)
  texts = ["a handwritten digit seven", "the number 3 written by hand", "digit 1"]
  docs = demo.placeholder_documents(tok, texts, sp)
  enc = CaptionEncoder(tok)
  mark = [sp["boi"], sp["eoi"]]
  for i, (doc, text) in enumerate(zip(docs, texts)):
    body = enc(text)
    want = [sp["bos"]] + (body + mark if i % 2 == 0 else mark + body) + [sp["eos"]]
    assert doc == want
    assert sp["boi"] not in body and sp["eoi"] not in body


def test_caption_with_fact_names_the_number_of_the_caption():
  assert demo.caption_with_fact("a handwritten digit seven", 7, 0) == "a handwritten digit seven; in numerals 7"
  assert demo.caption_with_fact("the numeral 7, handwritten", 7, 0) == "the numeral 7, handwritten; in words seven"
  assert demo.caption_with_fact("digit 9", 9, 1) == "digit 9; the next number is zero"
  assert demo.caption_with_fact("digit 0", 0, 2) == "digit 0; the number before it is nine"


@pytest.mark.slow
def test_ci_sized_demo_writes_a_report_with_all_fields(tmp_path):
  workdir = tmp_path / "demo"
  buf = io.StringIO()
  with redirect_stdout(buf):
    rc = cli.main(["demo", "--workdir", str(workdir), "--config", "configs/demo_digits.py:ci", "--json"])
  assert rc == 0
  printed = json.loads(buf.getvalue().strip().splitlines()[-1])
  stored = json.loads((workdir / "metrics.json").read_text())
  m = stored["metrics"]
  assert printed["caption_accuracy"] == m["caption_accuracy"]
  for k in ("caption_accuracy", "generation_accuracy", "cider_d", "diffusion_loss_mean", "fid", "text_nll",
            "text_nll_base"):
    assert np.isfinite(m[k]), k
  assert 0.0 <= m["caption_accuracy"] <= 1.0 and 0.0 <= m["generation_accuracy"] <= 1.0
  # the method's invariant: LMFusion training left the text side bit-identical
  assert m["text_nll_unchanged"] is True and m["text_nll"] == m["text_nll_base"]
  assert set(stored["timings_s"]) == {"dataset + tokenizer", "text LM pretraining", "HF export + convert-llama",
                                      "LMFusion training", "evaluation", "sample grid"}
  report = (workdir / "report.md").read_text()
  for field in ("captioning accuracy", "generation accuracy", "CIDEr-D", "diffusion loss", "text NLL of the base LM",
                "text NLL after LMFusion training", "unchanged to the last bit | True", "samples_grid.png"):
    assert field in report, field
  grid = np.asarray(Image.open(workdir / "samples_grid.png"))
  # one row per digit (10), 2 samples per row in the :ci config, images upscaled 4x from 8x8 with 2px padding,
  # after a left margin holding each row's prompt (dark text pixels in every row)
  assert grid.shape[0] == 10 * 32 + 11 * 2
  margin = grid.shape[1] - (2 * 32 + 3 * 2)
  assert margin > 40
  assert all((grid[2 + r * 34:2 + r * 34 + 32, :margin] < 128).any() for r in range(10))
  for sub in ("tokenizer", "tfds", "base_lm", "hf_base_lm/config.json", "converted/lmfusion.json", "lmfusion"):
    assert (workdir / sub).exists(), sub


@pytest.mark.parametrize("arg", ["", "ci", "tok64"])
def test_mnist_demo_configs_are_consistent(arg):
  """configs/demo_mnist.py (and :ci): MNIST 32x32 pixel latents, U-Net tokens matching the data config."""
  from lmfusion_jax.run_config import load_config, model_configs
  cfg = load_config("configs/demo_mnist.py" + (f":{arg}" if arg else ""))
  _, fcfg, _ = model_configs(cfg)
  assert cfg.data.dataset == "mnist" and cfg.data.image_size == fcfg.latent_size == 32
  assert fcfg.tokens_per_image == cfg.data.tokens_per_image
  assert demo.grid_scale(cfg) >= 1
