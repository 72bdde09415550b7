"""TFDS builder `lmfusion_image_captions`: a user folder of images + captions -> VAE latent records.

Input folder:
  images (any format PIL reads, in subfolders too) and a caption file, either
    captions.jsonl   one {"file": "relative/path.jpg", "caption": "..."} per line, or
    captions.csv     a header row with columns `file,caption`,
  both UTF-8. A record's file must stay inside the folder (no absolute path, no `..` out, no symlink
  resolving out); such records are refused when the captions are read, before anything is encoded.
Each image is converted to 8-bit RGB (16-bit scaled, transparency composited onto white), center-cropped
to a square, resized to `image_size` (bicubic), mapped to [-1, 1] and encoded with the Flax VAE
(`lmfusion_jax.models.vae.encode_latents`, posterior mean, batched and jitted; the last batch is padded
so one program serves all batches). Records:
  {"caption": str, "latent": float32[image_size / f, image_size / f, C], "id": file}
An unreadable image raises BadImageError naming the file, or with on_bad_image="skip" is skipped;
the skipped files are listed in the dataset's metadata (`builder.info.metadata["skipped_images"]`).
The builder config is named "res{image_size}" unless `config_name` is given; the options that made a
dataset are fingerprinted, and rebuilding the same name with different options is an error.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lmfusion_jax.data.tfds_quiet import quiet_download_config
from lmfusion_jax.errors import UserError

BUILDER_NAME = "lmfusion_image_captions"
VERSION = "1.0.0"
ON_BAD_IMAGE = ("error", "skip")


class BadImageError(UserError):
  """An image could not be read or decoded; the message names the file."""


class CaptionsFileError(UserError):
  """The captions file is missing or malformed; the message names the file and line."""


def _decode(path: epath.Path) -> str:
  """The text of a captions file: UTF-8 (a leading byte-order mark is dropped), else CaptionsFileError."""
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise CaptionsFileError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                            f"save the captions file as UTF-8") from e


def _read_records(source_dir: epath.Path) -> tuple:
  """(captions file, [(line, file, caption)]) from captions.jsonl or captions.csv, in file order."""
  jsonl, csv_path = source_dir / "captions.jsonl", source_dir / "captions.csv"
  records = []
  if jsonl.exists():
    for n, line in enumerate(_decode(jsonl).splitlines(), start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        records.append((n, str(obj["file"]), str(obj["caption"])))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CaptionsFileError(f"{jsonl}:{n}: expected {{\"file\": ..., \"caption\": ...}} ({e!r})") from e
    return jsonl, records
  if csv_path.exists():
    rows = csv.DictReader(_decode(csv_path).splitlines())
    if rows.fieldnames is None or not {"file", "caption"} <= set(rows.fieldnames):
      raise CaptionsFileError(f"{csv_path}: header must have columns 'file' and 'caption', "
                              f"got {rows.fieldnames}")
    for n, row in enumerate(rows, start=2):
      if row["file"] is None or row["caption"] is None:
        raise CaptionsFileError(f"{csv_path}:{n}: missing 'file' or 'caption'")
      records.append((n, row["file"], row["caption"]))
    return csv_path, records
  raise CaptionsFileError(f"{source_dir}: no captions.jsonl or captions.csv")


def _escapes(source_dir: epath.Path, file: str) -> Optional[str]:
  """Why `file` (a record's path) points outside `source_dir`, or None if it stays inside.

  Lexically: absolute paths and `..` that climbs out; on a local disk also after resolving symlinks (a
  file or folder symlink may point anywhere inside the source folder, but not out of it).
  """
  if posixpath.isabs(file) or os.path.isabs(file):
    return "an absolute path"
  norm = posixpath.normpath(file.replace(os.sep, "/"))
  if norm == ".." or norm.startswith("../"):
    return "'..' leads out of the source folder"
  root = os.fspath(source_dir)
  if "://" in root:   # gs:// and other remote stores have no symlinks
    return None
  real_root, real = os.path.realpath(root), os.path.realpath(os.path.join(root, file))
  if os.path.commonpath([real_root, real]) != real_root:
    return f"a symlink resolves to {real}, outside the source folder"
  return None


def read_captions(source_dir) -> list:
  """[(relative file, caption)] from captions.jsonl or captions.csv in `source_dir`, in file order.

  Every record is checked here, before any image is read: its file must lie inside `source_dir`
  (CaptionsFileError naming the captions file, line and record otherwise) and be listed once.
  """
  source_dir = epath.Path(source_dir)
  path, records = _read_records(source_dir)
  if not records:
    raise CaptionsFileError(f"{path}: the captions file lists no images")
  seen = set()
  for n, f, _ in records:
    why = _escapes(source_dir, f)
    if why:
      raise CaptionsFileError(f"{path}:{n}: record file {f!r} is refused: {why}")
    if f in seen:
      raise CaptionsFileError(f"{path}:{n}: image {f!r} is listed twice")
    seen.add(f)
  return [(f, caption) for _, f, caption in records]


def load_image(path, image_size: int) -> np.ndarray:
  """Image file -> float32 [image_size, image_size, 3] in [-1, 1] (8-bit RGB via
  `inference.image_files.to_8bit`: 16-bit scaled, transparency on white; center crop, bicubic)."""
  from PIL import Image
  from lmfusion_jax.inference.image_files import to_8bit
  try:
    with epath.Path(path).open("rb") as f:
      img = Image.open(f)
      img.load()
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError ...)
    raise BadImageError(f"image {path}: cannot be read ({type(e).__name__}: {e})") from e
  img = to_8bit(img, "RGB")
  w, h = img.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  img = img.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def _fingerprint(source_dir, vae_dir, image_size: int, on_bad_image: str, test_size: int) -> str:
  h = hashlib.sha256()
  source_dir, vae_dir = epath.Path(source_dir), epath.Path(vae_dir)
  for name in ("captions.jsonl", "captions.csv"):
    if (source_dir / name).exists():
      h.update(name.encode() + (source_dir / name).read_bytes())
  for p in sorted(vae_dir.iterdir()):
    if p.is_file():
      h.update(p.name.encode() + str(p.stat().length).encode())
      if p.name.endswith(".json"):
        h.update(p.read_bytes())
  h.update(json.dumps([os.fspath(source_dir), image_size, on_bad_image, test_size]).encode())
  return h.hexdigest()[:16]


def record_features(latent_shape) -> tfds.features.FeaturesDict:
  """The records' TFDS features: {caption, latent float32[latent_shape], id} (shared with `prepare-data`,
  which writes the same on-disk format)."""
  return tfds.features.FeaturesDict({
      "caption": tfds.features.Text(),
      "latent": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32),
      "id": tfds.features.Text(),
  })


class ImageCaptionsConfig(tfds.core.BuilderConfig):
  def __init__(self, *, name: str, source_dir: str, vae_dir: str, image_size: int, batch_size: int,
               on_bad_image: str, test_size: int, fingerprint: str):
    super().__init__(name=name, version=VERSION, description=f"fingerprint={fingerprint}")
    self.source_dir, self.vae_dir, self.image_size = source_dir, vae_dir, image_size
    self.batch_size, self.on_bad_image, self.test_size = batch_size, on_bad_image, test_size
    self.fingerprint = fingerprint


class LmfusionImageCaptions(tfds.core.GeneratorBasedBuilder):
  """Images + captions -> {caption, latent, id} via the Flax VAE."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *args, **kwargs):
    self._vae_cache = None
    super().__init__(*args, **kwargs)

  def _vae(self):
    if self._vae_cache is None:
      from lmfusion_jax.checkpoints.vae import load_vae
      self._vae_cache = load_vae(self.builder_config.vae_dir)
    return self._vae_cache

  def _latent_shape(self) -> tuple:
    cfg, _ = self._vae()
    f = cfg.downsample_factor
    size = self.builder_config.image_size
    if size % f:
      raise UserError(f"image_size={size} is not divisible by the VAE's downsample factor {f}")
    return (size // f, size // f, cfg.latent_channels)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=record_features(self._latent_shape()),
        metadata=tfds.core.MetadataDict(fingerprint=self.builder_config.fingerprint,
                                        skipped_images=[]))

  def _split_generators(self, dl_manager):
    entries = read_captions(self.builder_config.source_dir)
    n_test = self.builder_config.test_size
    if not 0 <= n_test < len(entries):
      raise UserError(f"test_size={n_test} must be in [0, {len(entries)}) for {len(entries)} images")
    order = np.random.default_rng(0).permutation(len(entries))
    test = set(order[:n_test].tolist())
    splits = {"train": self._generate_examples([e for i, e in enumerate(entries) if i not in test])}
    if n_test:
      splits["test"] = self._generate_examples([e for i, e in enumerate(entries) if i in test])
    return splits

  def _generate_examples(self, entries):
    from lmfusion_jax.models.vae import jit_encode_latents
    c = self.builder_config
    _, vae = self._vae()
    encode = jit_encode_latents(vae)
    source = epath.Path(c.source_dir)
    batch = []

    def flush():
      images = np.stack([img for _, _, img in batch])
      pad = c.batch_size - len(batch)
      if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      latents = np.asarray(encode(images))[:len(batch)]   # [batch, h, w, C]
      for (file, caption, _), latent in zip(batch, latents):
        if not np.all(np.isfinite(latent)):
          raise BadImageError(f"image {source / file}: the VAE produced NaN/Inf latents")
        yield file, {"caption": caption, "latent": latent.astype(np.float32), "id": file}
      batch.clear()

    from lmfusion_jax.progress import Progress
    with Progress(len(entries), "build-data: encode", unit="image") as progress:
      for file, caption in entries:
        progress.update(1)
        try:
          img = load_image(source / file, c.image_size)
        except BadImageError:
          if c.on_bad_image != "skip":
            raise
          self.info.metadata["skipped_images"].append(file)
          continue
        batch.append((file, caption, img))
        if len(batch) == c.batch_size:
          yield from flush()
      if batch:
        yield from flush()


def _dataset_dir(data_dir, config_name: str) -> epath.Path:
  return epath.Path(data_dir) / BUILDER_NAME / config_name / VERSION


def build_image_captions(data_dir, *, source_dir, vae_dir, image_size: int = 256,
                         config_name: Optional[str] = None, batch_size: int = 16,
                         on_bad_image: str = "error", test_size: int = 0) -> tfds.core.DatasetBuilder:
  """Encodes `source_dir` with the VAE in `vae_dir` into `data_dir` (idempotent, atomic).

  Returns the prepared builder. Rebuilding an existing config with different inputs is an error
  (choose another `config_name` or data_dir).
  """
  if on_bad_image not in ON_BAD_IMAGE:
    raise UserError(f"on_bad_image={on_bad_image!r} not in {ON_BAD_IMAGE}")
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be >= 1")
  name = config_name or f"res{image_size}"
  fingerprint = _fingerprint(source_dir, vae_dir, image_size, on_bad_image, test_size)
  existing = _dataset_dir(data_dir, name)
  if (existing / "dataset_info.json").exists():
    stored = image_captions_reader(data_dir, name).info.metadata.get("fingerprint")
    if stored != fingerprint:
      raise UserError(f"{existing} was built from other inputs (fingerprint {stored}, now {fingerprint}); "
                       f"use another config_name or data_dir, or delete it")
    return image_captions_reader(data_dir, name)
  read_captions(source_dir)   # every record checked before the VAE is loaded (again when the splits are made)
  config = ImageCaptionsConfig(name=name, source_dir=os.fspath(source_dir), vae_dir=os.fspath(vae_dir),
                               image_size=image_size, batch_size=batch_size, on_bad_image=on_bad_image,
                               test_size=test_size, fingerprint=fingerprint)
  builder = LmfusionImageCaptions(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
  builder.download_and_prepare(download_config=quiet_download_config())
  return image_captions_reader(data_dir, name)


def image_captions_reader(data_dir, config_name: str) -> tfds.core.DatasetBuilder:
  """A read-only builder for a prepared image_captions dataset (no VAE or source folder needed)."""
  path = _dataset_dir(data_dir, config_name)
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no prepared image_captions dataset at {path}; build it with "
                            f"build_dataset('image_captions', data_dir, source_dir=..., vae_dir=...)")
  return tfds.builder_from_directory(os.fspath(path))
