"""The digits TFDS builder (real sklearn pixels, fixed split) and the locally trained tokenizer."""
import os

import numpy as np
import pytest
from sklearn.datasets import load_digits
from transformers import AutoTokenizer

from lmfusion_jax.data import pipeline, tfds_digits, tokenizer as tk
from lmfusion_jax.data.batch import check_batch
from lmfusion_jax.data.build import build_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  build_dataset("digits", str(d), image_size=8)
  return str(d)


def _records(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def test_digits_builder_records_split_and_pixels(data_dir):
  ref = load_digits()
  builder = build_dataset("digits", data_dir, image_size=8)      # idempotent: already prepared
  assert builder.info.splits["train"].num_examples == 1497
  assert builder.info.splits["test"].num_examples == 300
  train, test = _records(builder, "train"), _records(builder, "test")
  ids = [int(r["id"].decode()) for r in train + test]
  assert sorted(ids) == list(range(1797))                         # every image exactly once
  test_labels = np.array([r["label"] for r in test])
  assert np.bincount(test_labels, minlength=10).tolist() == [30] * 10   # stratified
  for r in train + test:
    i = int(r["id"].decode())
    assert r["label"] == ref.target[i]
    np.testing.assert_array_equal(r["latent"][..., 0], ref.images[i] / 8.0 - 1.0)
    caption = r["caption"].decode()
    assert tfds_digits.WORDS[r["label"]] in caption.split() or str(r["label"]) in caption.replace(",", " ").split()
  captions = {r["caption"].decode() for r in train}
  assert any(c.startswith("the number 7") for c in captions)     # numeral form
  assert any(c.endswith("digit seven") for c in captions)        # word form
  # the split is fixed: a second build elsewhere gives the same test ids
  _, test_idx = tfds_digits.split_indices(ref.target)
  assert sorted(int(r["id"].decode()) for r in test) == test_idx.tolist()


def test_digits_upsampled_config(tmp_path):
  ref = load_digits()
  builder = build_dataset("digits", str(tmp_path), image_size=16)
  r = builder.as_data_source("test")[0]
  i = int(r["id"].decode())
  assert r["latent"].shape == (16, 16, 1)
  np.testing.assert_array_equal(r["latent"][..., 0], np.kron(ref.images[i] / 8.0 - 1.0, np.ones((2, 2))))
  with pytest.raises(ValueError, match="image_size"):
    build_dataset("digits", str(tmp_path), image_size=12)


def test_tokenizer_loads_with_autotokenizer_and_specials_are_single_ids(tmp_path):
  out = tmp_path / "tok"
  tk.train_tokenizer(tfds_digits.all_captions() * 5, 320, str(out))
  assert sorted(os.listdir(tmp_path)) == ["tok"]                  # no temporary folder left behind
  tok = AutoTokenizer.from_pretrained(str(out))
  ids = tk.special_ids(tok)
  assert len(set(ids.values())) == 5
  for key, name in (("bos", tk.BOS), ("eos", tk.EOS), ("boi", tk.BOI), ("eoi", tk.EOI)):
    assert tok(name, add_special_tokens=False)["input_ids"] == [ids[key]]   # one id each
    assert name in tok.all_special_tokens
  assert tok.bos_token == tk.BOS and tok.eos_token == tk.EOS
  assert tok.convert_ids_to_tokens(ids["boi"]) == "<|reserved_special_token_0|>"
  assert tok.convert_ids_to_tokens(ids["eoi"]) == "<|reserved_special_token_1|>"
  text = "a handwritten digit seven"
  enc = tok(text)["input_ids"]
  assert enc[0] == ids["bos"] and tok.decode(enc[1:]) == text
  # caption text that spells a special token is not turned into that token
  plain = tk.CaptionEncoder(tok)("<|reserved_special_token_0|>")
  assert ids["boi"] not in plain and tok.decode(plain) == "<|reserved_special_token_0|>"
  with pytest.raises(tk.TokenizerError, match="reserved_special_token_0"):
    tk.special_ids(_NoBoi(tok))


class _NoBoi:
  def __init__(self, tok):
    self.vocab = {k: v for k, v in tok.get_vocab().items() if k != tk.BOI}
    self.pad_token_id = tok.pad_token_id

  def get_vocab(self):
    return self.vocab


def test_pipeline_on_digits(data_dir, tmp_path):
  tok = tk.train_tokenizer(tfds_digits.all_captions() * 5, 320, str(tmp_path / "tok"))
  cfg = pipeline.default_data_config()
  cfg.update(dict(data_dir=data_dir, global_batch_size=4, text_len=32, image_slots=2, tokens_per_image=16))
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  ref = load_digits()
  allowed = {(img / 8.0 - 1.0).astype(np.float32).tobytes() for img in ref.images}
  for _ in range(3):
    b = next(it)
    check_batch(b, 32, 2)
    lat = b["latents"][b["image_segment_ids"] > 0]
    assert lat.shape[1:] == (8, 8, 1) and len(lat) > 0
    assert all(x[..., 0].tobytes() in allowed for x in lat)
  ev = list(pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1))
  assert sum(int((b["image_segment_ids"] > 0).sum()) for b in ev) == 300
