"""The Grain input pipeline: records -> documents -> packed rows -> host-local batches.

  MapDataset.source(records)
    .map_with_index(record -> Document)   per-example RNG seeded by (seed, epoch * num_records + record)
    .shuffle(seed)                        a new permutation every epoch (training only)
    [process_index::process_count]        each process reads a disjoint slice of every epoch
    .repeat(num_epochs)                   (training only; None = forever)
    .to_iter_dataset(ReadOptions)         per-record work on `read_threads` threads ...
    .mp_prefetch(num_workers)             ... or in worker processes
    PackIterDataset                       next-fit packing into rows, in the main process (checkpointable)
    .batch(global_batch_size / process_count)

The returned object is a `grain.DatasetIterator`: `get_state()` / `set_state()` give a small JSON
state that the trainer saves with orbax (`grain.checkpoint.CheckpointSave(it)` /
`grain.checkpoint.CheckpointRestore(it)`); a restored iterator yields exactly the batches the
uninterrupted one would, with any number of workers. The state is per process (restore with the same
process count).

Data config (`config.data`, an ml_collections ConfigDict; defaults in `default_data_config()`):
  dataset              "digits" | "mnist" | "image_captions" | "synthetic"
  data_dir             TFDS data dir (local or gs://) holding the prepared datasets
  split / eval_split   split read by make_train_iterator / make_eval_iterator
  image_size           latent side: digits / mnist config "size{image_size}"; image_captions config
                       "res{image_size}" ("png{image_size}" with encode="online") unless `builder_config`
                       is set; synthetic latent side
  builder_config       explicit TFDS builder config name (image_captions); "" = derive from image_size
  encode               "precomputed": records hold VAE latents (`prepare-data --vae-dir`, build-data);
                       "online": records hold 8-bit images (`prepare-data --encode none`), batches carry uint8
                       "pixels" [batch, slots, S, S, 3] and the train step encodes them with the VAE in
                       `vae_dir` (training.online_encoding)
  vae_dir              (online) the Flax VAE folder from `lmfusion-jax convert-vae`
  crop_size            (online) 0 = encode the stored S x S image whole; else a random crop_size square
                       of it per image and step
  random_flip          (online) flip each image left-right with probability 1/2 per step
  text_len             T, text slots per packed row
  image_slots          I, image slots per packed row
  tokens_per_image     P, sequence positions one image takes (= the model's image tokens per image)
  global_batch_size    rows per step over all processes; each process yields global / process_count
  seed                 shuffle and per-example RNG seed
  caption_first_prob   P(caption before image) per training example (0.8)
  caption_dropout      P(caption replaced by the empty text) per training example (0.1)
  eval_order           "random" (per-example draw, no dropout) | "caption_first" | "image_first"
  num_workers          worker processes (grain mp_prefetch); 0 = threads in this process
  worker_buffer_size   elements buffered per worker
  read_threads         threads for per-record work in the reading process
  on_bad_record        "error" (raise naming the record) | "skip" (skip and count)
  tokenizer_dir        HF tokenizer folder (for callers that load it with `load_tokenizer`)
  shuffle              shuffle training records
  num_epochs           training epochs; None = repeat forever
  build_if_missing     build the digits / mnist dataset when absent (single-process runs only)
  synthetic_num_records / synthetic_channels   the synthetic source's size and latent channels
"""
from __future__ import annotations

from typing import Iterator, Optional

import grain
import ml_collections
import numpy as np

from lmfusion_jax.data import pack_stage
from lmfusion_jax.data.packing import empty_batch, empty_row
from lmfusion_jax.data.sequences import SequenceSpec, build_document
from lmfusion_jax.data.synthetic import SyntheticSource
from lmfusion_jax.data.tfds_quiet import quiet_download_config
from lmfusion_jax.data.tokenizer import CaptionEncoder, special_ids
from lmfusion_jax.errors import UserError

DATASETS = ("digits", "mnist", "image_captions", "synthetic")


class DataConfigError(UserError):
  """The data config is inconsistent; the message names the field."""


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for `config.data`: the embedded digits dataset, 8x8x1 latents, patch 2 -> 16 tokens."""
  return ml_collections.ConfigDict(dict(
      dataset="digits",
      data_dir="",
      split="train",
      eval_split="test",
      image_size=8,
      builder_config="",
      text_len=64,
      image_slots=2,
      tokens_per_image=16,
      global_batch_size=8,
      seed=0,
      caption_first_prob=0.8,
      caption_dropout=0.1,
      eval_order="random",
      num_workers=0,
      worker_buffer_size=2,
      read_threads=2,
      on_bad_record="error",
      tokenizer_dir="",
      shuffle=True,
      num_epochs=None,
      build_if_missing=True,
      synthetic_num_records=4096,
      synthetic_channels=4,
      encode="precomputed",
      vae_dir="",
      crop_size=0,
      random_flip=False,
  ))


ENCODE = ("precomputed", "online")


def encodes_online(data_cfg) -> bool:
  """data.encode, checked ("precomputed" for configs written before the field existed)."""
  mode = data_cfg.get("encode", "precomputed")
  if mode not in ENCODE:
    raise DataConfigError(f"data.encode={mode!r}: expected one of {ENCODE}")
  return mode == "online"


def make_source(data_cfg, split: str, *, process_count: int = 1):
  """(random-access source of records, latent shape (H, W, C)) for `data_cfg.dataset` / `split`; with
  data.encode="online" the records' image shape (S, S, 3) instead."""
  name = data_cfg.dataset
  online = encodes_online(data_cfg)
  if online and name != "image_captions":
    raise DataConfigError(f"data.encode='online' reads 8-bit images from an image_captions dataset "
                          f"(`prepare-data --encode none`); data.dataset={name!r} holds latents")
  if name == "synthetic":
    src = SyntheticSource(num_records=data_cfg.synthetic_num_records, image_size=data_cfg.image_size,
                          channels=data_cfg.synthetic_channels, seed=data_cfg.seed, split=split)
    return src, src.latent_shape
  if name not in DATASETS:
    raise DataConfigError(f"data.dataset={name!r} unknown (have {DATASETS})")
  if not data_cfg.data_dir:
    raise DataConfigError(f"data.data_dir is empty: dataset {name!r} is read from a TFDS data dir")
  if name in ("digits", "mnist"):
    from lmfusion_jax.data.build import pixel_builder
    builder = pixel_builder(name, data_cfg.data_dir, data_cfg.image_size)
    if not builder.is_prepared():
      if not (data_cfg.build_if_missing and process_count == 1):
        raise DataConfigError(f"{name} dataset is not prepared under {data_cfg.data_dir!r}; build it "
                              f"first with lmfusion_jax.data.build.build_dataset({name!r}, ...)")
      builder.download_and_prepare(download_config=quiet_download_config())
  else:
    from lmfusion_jax.data.tfds_image_captions import image_captions_reader
    config = data_cfg.builder_config or f"{'png' if online else 'res'}{data_cfg.image_size}"
    builder = image_captions_reader(data_cfg.data_dir, config)
  if split not in builder.info.splits:
    raise DataConfigError(f"dataset {name!r} has no split {split!r} (have {sorted(builder.info.splits)})")
  field = "image" if online else "latent"
  features = builder.info.features
  if field not in features:
    hint = ("data.encode='online' needs records with an 'image' field (written by `prepare-data --encode "
            "none`)" if online else "its records hold 8-bit images: train on it with "
            "--config.data.encode=online --config.data.vae_dir=VAE")
    raise DataConfigError(f"dataset {name!r} ({builder.data_dir}) has no {field!r} field (fields: "
                          f"{sorted(features.keys())}); {hint}")
  return builder.as_data_source(split), tuple(features[field].shape)


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags (defaults): outside an absl app, mark them parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _ToDocument:
  """(example index, record) -> Document | SkippedRecord. Picklable for worker processes."""

  def __init__(self, encode, spec: SequenceSpec, special: dict, seed: int):
    self.encode, self.spec, self.special, self.seed = encode, spec, special, seed

  def __call__(self, index: int, record: dict):
    return build_document(record, self.encode, self.spec, self.special, seed=self.seed,
                          example_index=index)


class _StackAndPad:
  """Stacks rows into a batch of exactly `batch_size`, padding a short last batch with empty rows."""

  def __init__(self, batch_size: int, text_len: int, image_slots: int, latent_shape, pixels: bool = False):
    self.batch_size = batch_size
    self.empty = empty_row(text_len, image_slots, latent_shape, pixels)

  def __call__(self, rows) -> dict:
    rows = list(rows) + [self.empty] * (self.batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in self.empty}


def local_batch_size(data_cfg, process_count: int) -> int:
  if data_cfg.global_batch_size % process_count:
    raise DataConfigError(f"data.global_batch_size={data_cfg.global_batch_size} is not divisible by "
                          f"the process count {process_count}")
  return data_cfg.global_batch_size // process_count


def _sequence_spec(data_cfg, latent_shape, *, training: bool) -> SequenceSpec:
  return SequenceSpec(
      text_len=data_cfg.text_len, image_slots=data_cfg.image_slots,
      tokens_per_image=data_cfg.tokens_per_image, latent_shape=tuple(latent_shape),
      caption_first_prob=data_cfg.caption_first_prob,
      caption_dropout=data_cfg.caption_dropout if training else 0.0,
      order="random" if training else data_cfg.eval_order,
      on_bad_record=data_cfg.on_bad_record, pixels=encodes_online(data_cfg))


def make_dataset(data_cfg, tokenizer, *, process_index: int, process_count: int, training: bool,
                 source=None, latent_shape=None) -> grain.IterDataset:
  """The pipeline as a grain IterDataset of host-local batches (see the module docstring).

  `source` / `latent_shape` override `make_source` (any random-access sequence of records).
  """
  if not 0 <= process_index < process_count:
    raise DataConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  batch = local_batch_size(data_cfg, process_count)
  if source is None:
    source, latent_shape = make_source(data_cfg, data_cfg.split if training else data_cfg.eval_split,
                                       process_count=process_count)
  if latent_shape is None:
    raise DataConfigError("make_dataset: a custom `source` needs its `latent_shape`")
  spec = _sequence_spec(data_cfg, latent_shape, training=training)
  to_doc = _ToDocument(CaptionEncoder(tokenizer), spec, special_ids(tokenizer), data_cfg.seed)

  ds = grain.MapDataset.source(source).map_with_index(to_doc)
  if training and data_cfg.shuffle:
    ds = ds.shuffle(seed=int(data_cfg.seed) % 2**32)
  ds = ds[process_index::process_count]
  if training:
    ds = ds.repeat(data_cfg.num_epochs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                            prefetch_buffer_size=max(batch * 4, 16)))
  if data_cfg.num_workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                     per_worker_buffer_size=data_cfg.worker_buffer_size))
  it = pack_stage.PackIterDataset(it, text_len=spec.text_len, image_slots=spec.image_slots,
                                  latent_shape=spec.latent_shape, on_bad_record=spec.on_bad_record,
                                  pixels=spec.pixels)
  return it.batch(batch, batch_fn=_StackAndPad(batch, spec.text_len, spec.image_slots,
                                               spec.latent_shape, spec.pixels))


def make_train_iterator(data_cfg, tokenizer, *, process_index: int, process_count: int,
                        source=None, latent_shape=None) -> grain.DatasetIterator:
  """Host-local training batches (dicts of numpy arrays, `lmfusion_jax.data.batch` layout)."""
  ds = make_dataset(data_cfg, tokenizer, process_index=process_index, process_count=process_count,
                    training=True, source=source, latent_shape=latent_shape)
  return iter(ds)


def make_eval_iterator(data_cfg, tokenizer, *, process_index: int, process_count: int,
                       num_batches: Optional[int] = None, source=None,
                       latent_shape=None) -> Iterator[dict]:
  """One pass over `data_cfg.eval_split` in file order: no shuffle, no caption dropout.

  Document order follows `data_cfg.eval_order`. With `num_batches`, exactly that many batches are
  yielded (all-padding batches after the data ends, truncated if more), so every process of a
  multi-host eval runs the same number of steps.
  """
  if source is None:
    source, latent_shape = make_source(data_cfg, data_cfg.eval_split, process_count=process_count)
  ds = make_dataset(data_cfg, tokenizer, process_index=process_index, process_count=process_count,
                    training=False, source=source, latent_shape=latent_shape)
  it = iter(ds)
  if num_batches is None:
    return it
  empty = empty_batch(local_batch_size(data_cfg, process_count), data_cfg.text_len,
                      data_cfg.image_slots, latent_shape, encodes_online(data_cfg))
  return _fixed_count(it, num_batches, empty)


def _fixed_count(it, num_batches: int, empty: dict) -> Iterator[dict]:
  for _ in range(num_batches):
    batch = next(it, None)
    yield {k: v.copy() for k, v in empty.items()} if batch is None else batch


def counters(iterator) -> dict:
  """{"rows", "documents", "skipped": {reason: count}} from a pipeline iterator's packing stage."""
  return pack_stage.find_pack_iterator(iterator).counters()
