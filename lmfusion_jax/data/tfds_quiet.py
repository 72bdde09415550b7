"""TFDS builds without per-example progress bars (they flood logs on pods and in CI)."""
from __future__ import annotations


def quiet_download_config():
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  return tfds.download.DownloadConfig()
