"""An independent digit classifier for scoring generated digit images (the digits demo).

Fitted on the REAL training images (scikit-learn's 8x8 digits, pixels 0..16 mapped to [-1, 1], possibly
upsampled), it tells which digit a generated image shows; `generation_accuracy` is the fraction of
generated images classified as the digit their prompt asked for.

Features: the image is area-averaged to 8x8 (`size`; any input size: each output pixel is the mean of the
input area it covers, fractional pixels weighted), flattened to 64 values, standardized (per-pixel mean/std
of the training set), then multinomial logistic regression (lbfgs: deterministic). Area averaging undoes
nearest-neighbour upsampling exactly and bilinear upsampling approximately. `kind="svm"` (used for MNIST,
`data.eval_sets.classifier_spec`): centred features and an RBF support vector machine (C=5, deterministic).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURE_SIZE = (8, 8)


@dataclasses.dataclass(frozen=True)
class DigitClassifier:
  pipeline: Pipeline                  # StandardScaler -> LogisticRegression (or SVC) on area-averaged pixels
  size: tuple[int, int] = FEATURE_SIZE
  classes: tuple[int, ...] = ()


def _area_matrix(in_len: int, out_len: int) -> np.ndarray:
  """[out_len, in_len] weights: row i averages input cells overlapping [i, i+1) * in_len / out_len."""
  scale = in_len / out_len
  edges_in = np.arange(in_len + 1, dtype=np.float64)
  out_lo = np.arange(out_len)[:, None] * scale                          # [out, 1]
  overlap = (np.minimum(edges_in[None, 1:], out_lo + scale)
             - np.maximum(edges_in[None, :-1], out_lo))                  # [out, in]
  return np.clip(overlap, 0.0, None) / scale


def _as_images(images, name: str) -> np.ndarray:
  """[N, H, W] or [N, H, W, 1] -> float64 [N, H, W]; rejects other shapes and non-finite values."""
  x = np.asarray(images, dtype=np.float64)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3 or x.shape[0] == 0 or min(x.shape[1:]) == 0:
    raise ValueError(f"{name}: expected a non-empty [N, H, W] or [N, H, W, 1] array, got shape "
                     f"{np.shape(images)}")
  bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
  if bad.any():
    raise ValueError(f"{name}: image {int(np.argmax(bad))} has non-finite pixels "
                     f"({int(bad.sum())} such images)")
  return x


def resize_area(images: np.ndarray, size: tuple[int, int] = FEATURE_SIZE) -> np.ndarray:
  """Area-average resize [N, H, W] -> [N, size[0], size[1]] (any H, W)."""
  x = _as_images(images, "resize_area images")
  rows = _area_matrix(x.shape[1], size[0])                              # [h, H]
  cols = _area_matrix(x.shape[2], size[1])                              # [w, W]
  return np.einsum("ih,nhw,jw->nij", rows, x, cols)


def _features(clf_size: tuple[int, int], images, name: str) -> np.ndarray:
  x = _as_images(images, name)
  return resize_area(x, clf_size).reshape(len(x), -1)                   # [N, 64]


def _as_labels(labels, n: int, name: str) -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1 or len(y) != n:
    raise ValueError(f"{name}: expected {n} labels as a 1-D array, got shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
  return y


def fit_digit_classifier(images, labels, c: float = 1.0, max_iter: int = 2000, size=FEATURE_SIZE,
                         kind: str = "logistic") -> DigitClassifier:
  """Fit on real images [N, H, W] or [N, H, W, 1] (float, any resolution) with integer labels [N]; features
  area-averaged to `size` [h, w]; kind "logistic" (C=c) or "svm" (RBF, C=5)."""
  size = tuple(int(v) for v in size)
  x = _features(size, images, "fit_digit_classifier images")
  y = _as_labels(labels, len(x), "fit_digit_classifier labels")
  if len(np.unique(y)) < 2:
    raise ValueError("fit_digit_classifier labels: need at least two classes")
  if kind == "logistic":
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
  elif kind == "svm":
    from sklearn.svm import SVC
    pipeline = make_pipeline(StandardScaler(with_std=False), SVC(C=5.0, gamma="scale"))
  else:
    raise ValueError(f"fit_digit_classifier kind={kind!r}: expected 'logistic' or 'svm'")
  pipeline.fit(x, y)
  return DigitClassifier(pipeline=pipeline, size=size,
                         classes=tuple(int(k) for k in pipeline.classes_))


def classify(clf: DigitClassifier, images) -> np.ndarray:
  """Predicted labels [N] (int) for images [N, H, W] or [N, H, W, 1]."""
  return clf.pipeline.predict(_features(clf.size, images, "classify images")).astype(np.int64)


def decision_features(clf: DigitClassifier, images) -> np.ndarray:
  """The classifier's decision function (per-class logits) [N, num_classes]: a digit feature space."""
  return clf.pipeline.decision_function(_features(clf.size, images, "decision_features images"))


def generation_accuracy(clf: DigitClassifier, images, prompted_labels: Sequence[int]) -> float:
  """Fraction of generated images whose predicted digit equals the digit the prompt asked for."""
  predicted = classify(clf, images)
  wanted = _as_labels(prompted_labels, len(predicted), "generation_accuracy prompted_labels")
  return float(np.mean(predicted == wanted))
