"""Frechet distance between Gaussians fitted to features of two image sets (the "FID" recipe).

  FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

computed like the reference implementations (TTUR / pytorch-fid): scipy's `sqrtm` of S1 S2; when that
is not finite (near-singular product) eps * I is added to both covariances and it is retried; a result
with a tiny imaginary part (numerical noise) keeps its real part, a larger one (|imag| > 1e-3 on the
diagonal) is an error. Covariances are unbiased (N - 1), as in those implementations.

The extractor is a hook: any `FeatureFn` (images -> [N, D] features) works, e.g. an Inception-v3 pool
layer for real FID. `digit_feature_fn(clf)` is the built-in one for the digits demo: the logits of the
digit classifier fitted on real training digits. Numbers from it are NOT comparable to Inception FID
(or to the paper's): they only rank models on the digits data.
"""
from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
from etils import epath
from scipy import linalg

from lmfusion_jax.checkpoints.files import write_bytes
from lmfusion_jax.errors import UserError
from lmfusion_jax.evaluation.metrics.digit_classifier import DigitClassifier, decision_features

FeatureFn = Callable[[np.ndarray], np.ndarray]   # images [N, ...] -> features [N, D]

IMAG_ATOL = 1e-3


def _mean_cov(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{name}: mean {mu.shape} and covariance {sigma.shape} do not match ([D], [D, D])")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{name}: mean/covariance have non-finite entries")
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D] (scalars if D = 1)."""
  mu1, sigma1 = _mean_cov(mu1, sigma1, "frechet_distance first Gaussian")
  mu2, sigma2 = _mean_cov(mu2, sigma2, "frechet_distance second Gaussian")
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)   # singular products are handled below
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = eps * np.eye(mu1.shape[0])
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if not np.isfinite(covmean).all():
    raise ValueError("frechet_distance: sqrtm(sigma1 @ sigma2) is not finite even with eps added")
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > IMAG_ATOL:
      raise ValueError(f"frechet_distance: sqrtm(sigma1 @ sigma2) has imaginary diagonal part {imag:.3g} "
                       f"(> {IMAG_ATOL}); are both covariances positive semi-definite?")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] of features [N, D] (N >= 2)."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"gaussian_stats: expected features [N >= 2, D], got shape {f.shape}")
  if not np.isfinite(f).all():
    row = int(np.argmax(~np.isfinite(f).all(axis=1)))
    raise ValueError(f"gaussian_stats: row {row} has non-finite features")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def fid_from_features(feats_a, feats_b) -> float:
  """Frechet distance between Gaussians fitted to features [N, D] and [M, D]."""
  return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def fid_from_images(images_a, images_b, feature_fn: FeatureFn) -> float:
  """Frechet distance of two image sets in the feature space of `feature_fn`."""
  return fid_from_features(feature_fn(images_a), feature_fn(images_b))


def digit_feature_fn(clf: DigitClassifier) -> FeatureFn:
  """Digits-demo extractor: the digit classifier's logits [N, 10]. NOT Inception FID."""
  return lambda images: decision_features(clf, images)


# pytorch-fid's statistics files: an .npz with `mu` [D] and `sigma` [D, D] (float64), as its `save_fid_stats`
# writes them (`lmfusion-jax fid-stats` writes the same).
INCEPTION_DIM = 2048


def save_fid_stats(mu, sigma, path) -> str:
  """Writes mu [D] / sigma [D, D] (float64) as an .npz at `path`, atomically."""
  mu, sigma = _mean_cov(mu, sigma, f"save_fid_stats {path}")
  buf = io.BytesIO()
  np.savez_compressed(buf, mu=mu, sigma=sigma)
  write_bytes(path, buf.getvalue())
  return str(path)


def load_fid_stats(path, dim: int | None = INCEPTION_DIM) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) from an .npz with keys `mu`, `sigma` (pytorch-fid's format); `dim` (default the
  Inception pool3 width, None: any) is checked. Raises UserError naming the file."""
  try:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as f:   # local or gs://
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise UserError(f"{path}: FID statistics need keys 'mu' and 'sigma'; missing {missing} "
                        f"(found {sorted(f.files)})")
      mu, sigma = f["mu"], f["sigma"]
  except UserError:
    raise
  except Exception as e:   # OSError, ValueError (a pickle refused), zipfile.BadZipFile, EOFError ...
    raise UserError(f"{path}: not a readable .npz of FID statistics ({type(e).__name__}: {e})") from e
  want = "[D], [D, D]" if dim is None else f"[{dim}], [{dim}, {dim}]"
  d = mu.shape[0] if mu.ndim == 1 else -1
  if mu.ndim != 1 or sigma.shape != (d, d) or (dim is not None and d != dim):
    raise UserError(f"{path}: FID statistics have mu {list(mu.shape)} and sigma {list(sigma.shape)}; expected "
                    f"{want} (Inception pool3 statistics, e.g. from `lmfusion-jax fid-stats`)")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise UserError(f"{path}: FID statistics have NaN or Inf entries")
  return mu.astype(np.float64), sigma.astype(np.float64)


def fid_from_stats(a, b, dim: int | None = INCEPTION_DIM) -> float:
  """Frechet distance between two statistics: each an .npz path (pytorch-fid's format) or a (mu, sigma)
  pair; both must be `dim`-dimensional (default 2048; None: any, but equal)."""
  def stats(x, which):
    if not isinstance(x, (tuple, list)):
      return load_fid_stats(x, dim)
    mu, sigma = _mean_cov(*x, f"fid_from_stats: the {which} statistics")
    if dim is not None and mu.shape[0] != dim:
      raise UserError(f"fid_from_stats: the {which} statistics are {mu.shape[0]}-dimensional, expected {dim}")
    return mu, sigma
  (mu1, s1), (mu2, s2) = stats(a, "first"), stats(b, "second")
  if mu1.shape != mu2.shape:
    name = lambda x, which: which if isinstance(x, (tuple, list)) else str(x)
    raise UserError(f"fid_from_stats: {name(a, 'the first statistics')} are {mu1.shape[0]}-dimensional, "
                    f"{name(b, 'the second statistics')} {mu2.shape[0]}-dimensional")
  return frechet_distance(mu1, s1, mu2, s2)
