"""TFDS builder `lmfusion_digits`: scikit-learn's bundled handwritten digits as caption/latent records.

The embedded default dataset (no download): 1797 real 8x8 grey images, 10 classes. Each record is
  {"caption": str, "latent": float32[S, S, 1] in [-1, 1], "label": int, "id": str(sklearn index)}
with pixel value v in 0..16 mapped to v / 8 - 1 and upsampled by pixel repetition to S in {8, 16, 32}
(builder configs "size8", "size16", "size32"). The split is fixed: for each class, a permutation drawn
from numpy's PCG64 with seed 0; its first 30 indices go to `test` (300 records), the rest to `train`
(1497). Captions come from several templates (digit as word and as numeral), one per record, chosen by
a generator seeded with the record index. Written as ArrayRecord without TensorFlow.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lmfusion_jax.errors import UserError

NUM_CLASSES = 10
TEST_PER_CLASS = 30
SPLIT_SEED = 0
IMAGE_SIZES = (8, 16, 32)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a picture of the digit {word}",
    "a handwritten {num}",
    "an image of the number {word}",
    "the numeral {num}, handwritten",
    "a low resolution scan of a handwritten {word}",
    "digit {num}",
)


def caption_for(label: int, index: int) -> str:
  """The caption of sklearn digit `index` (class `label`): a template picked by index."""
  template = TEMPLATES[int(np.random.default_rng([SPLIT_SEED, int(index)]).integers(len(TEMPLATES)))]
  return template.format(word=WORDS[label], num=label)


def references(record: dict) -> list:
  """Evaluation references of a record: every caption template of its digit."""
  return [t.format(word=WORDS[record["label"]], num=record["label"]) for t in TEMPLATES]


def generation_prompts(records: list, samples_per_class: int, num_generated: int) -> tuple:
  """(prompt texts, prompted labels) for generation evaluation: templates naming each digit (cycled)."""
  del records, num_generated
  prompts, labels = [], []
  for c in range(NUM_CLASSES):
    for k in range(samples_per_class):
      prompts.append(TEMPLATES[k % len(TEMPLATES)].format(word=WORDS[c], num=c))
      labels.append(c)
  return prompts, labels


def all_captions() -> list:
  """Every caption any record can have (for training a tokenizer)."""
  return [t.format(word=WORDS[d], num=d) for d in range(NUM_CLASSES) for t in TEMPLATES]


def split_indices(labels: np.ndarray, test_per_class: int = TEST_PER_CLASS) -> tuple:
  """(train, test) record indices, both sorted; test holds `test_per_class` of each class (the first of a PCG64
  permutation of its members, seed SPLIT_SEED, drawn class after class)."""
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    members = np.nonzero(labels == c)[0]
    test.extend(rng.permutation(members)[:test_per_class].tolist())
  test = np.sort(np.asarray(test, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def to_latent(image: np.ndarray, image_size: int) -> np.ndarray:
  """[8, 8] pixels in 0..16 -> float32 [S, S, 1] in [-1, 1], upsampled by pixel repetition."""
  if image_size not in IMAGE_SIZES:
    raise UserError(f"digits: image_size={image_size} not in {IMAGE_SIZES}")
  x = np.asarray(image, np.float32) / 8.0 - 1.0
  r = image_size // 8
  x = np.repeat(np.repeat(x, r, axis=0), r, axis=1)
  return x[:, :, None]


class SizeConfig(tfds.core.BuilderConfig):
  """Builder config "size{S}": S x S x 1 pixel latents (this builder's and tfds_mnist's)."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f"size{image_size}", description=f"latents {image_size}x{image_size}x1",
                     **kwargs)
    self.image_size = image_size


def labelled_features(image_size: int):
  """{caption, latent float32 [S, S, 1], label (10 classes), id}: the records of the labelled digit datasets."""
  return tfds.features.FeaturesDict({
      "caption": tfds.features.Text(),
      "latent": tfds.features.Tensor(shape=(image_size, image_size, 1), dtype=np.float32),
      "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
      "id": tfds.features.Text(),
  })


class LmfusionDigits(tfds.core.GeneratorBasedBuilder):
  """sklearn digits -> {caption, latent, label, id}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [SizeConfig(image_size=s) for s in IMAGE_SIZES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=labelled_features(self.builder_config.image_size), supervised_keys=None)

  def _split_generators(self, dl_manager):
    from sklearn.datasets import load_digits
    digits = load_digits()
    train, test = split_indices(digits.target)
    return {"train": self._generate_examples(digits, train),
            "test": self._generate_examples(digits, test)}

  def _generate_examples(self, digits, indices):
    s = self.builder_config.image_size
    for i in indices:
      label = int(digits.target[i])
      yield int(i), {"caption": caption_for(label, int(i)), "latent": to_latent(digits.images[i], s),
                     "label": label, "id": str(int(i))}


def digits_builder(data_dir: str, image_size: int = 8) -> LmfusionDigits:
  if image_size not in IMAGE_SIZES:
    raise UserError(f"digits: image_size={image_size} not in {IMAGE_SIZES}")
  return LmfusionDigits(data_dir=str(data_dir), config=f"size{image_size}", file_format="array_record")
