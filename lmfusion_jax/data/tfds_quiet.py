"""TFDS builds without per-example progress bars (they flood logs on pods and in CI)."""
from __future__ import annotations


def quiet_download_config():
  """The DownloadConfig every build of the package uses; also (unless `--verbose`, lmfusion_jax.logs) drops
  TFDS's "Downloading and preparing dataset ... Unknown size" and "... downloaded and prepared" prints."""
  import tensorflow_datasets as tfds
  from lmfusion_jax import logs
  tfds.disable_progress_bar()
  if not logs.verbose():
    builder = tfds.core.DatasetBuilder
    for name in ("_log_download_bytes", "_log_download_done"):
      if callable(getattr(builder, name, None)):
        setattr(builder, name, lambda self: None)
  return tfds.download.DownloadConfig()
