"""What each dataset gives evaluation: the references a caption is scored against and the prompts images are
generated from. Datasets without their own (image_captions, synthetic) use the records' captions.

  references(dataset, record) -> [reference captions]
  generation_prompts(dataset, records, samples_per_class, num_generated) -> (prompts, prompted labels | None)
  classifier_spec(dataset) -> {"size": (h, w), "kind": "logistic" | "svm"}: the independent image
      classifier's features (area-averaged to h x w) and model (`evaluation.metrics.fit_digit_classifier`)

`record` is {"id", "caption", "latent", "label" (None when unlabelled)}.
"""
from __future__ import annotations

from typing import Optional

from lmfusion_jax.data import tfds_digits


def _caption_references(record: dict) -> list:
  return [record["caption"]]


def _caption_prompts(records: list, samples_per_class: int, num_generated: int) -> tuple:
  """Labelled records: `samples_per_class` captions of each class (cycled); else the first `num_generated`
  captions (cycled), with no labels."""
  if all(r["label"] is not None for r in records):
    chosen = []
    for c in sorted({r["label"] for r in records}):
      members = [r for r in records if r["label"] == c]
      chosen += [members[k % len(members)] for k in range(samples_per_class)]
    return [r["caption"] for r in chosen], [r["label"] for r in chosen]
  chosen = [records[k % len(records)] for k in range(num_generated)]
  return [r["caption"] for r in chosen], None


# dataset name -> (references, generation_prompts)
_OWN = {"digits": (tfds_digits.references, tfds_digits.generation_prompts),
        "mnist": (tfds_digits.references, tfds_digits.generation_prompts)}   # the same caption templates
# dataset name -> the generation classifier: 8x8 logistic regression for the 8x8 digits (96-97% on held-out
# real digits); 28x28 MNIST loses strokes at 8x8 (87% held out), so 14x14 and an RBF SVM (97% held out)
_CLASSIFIER = {"mnist": {"size": (14, 14), "kind": "svm"}}
_DEFAULT_CLASSIFIER = {"size": (8, 8), "kind": "logistic"}
_DEFAULT = (_caption_references, _caption_prompts)


def references(dataset: str, record: dict) -> list:
  if record["label"] is None:
    return _caption_references(record)
  return _OWN.get(dataset, _DEFAULT)[0](record)


def generation_prompts(dataset: str, records: list, samples_per_class: int,
                       num_generated: int) -> tuple[list, Optional[list]]:
  return _OWN.get(dataset, _DEFAULT)[1](records, samples_per_class, num_generated)


def classifier_spec(dataset: str) -> dict:
  return dict(_CLASSIFIER.get(dataset, _DEFAULT_CLASSIFIER))
