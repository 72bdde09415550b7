"""`prepare_data`: web-scale image-caption shards (webdataset, parquet) or a folder -> the image_captions TFDS
dataset (ArrayRecord) that `train --config.data.dataset=image_captions` reads, on one host or many.

  sources.py   source pattern -> input shards -> raw records (webdataset / pyarrow / build-data's reader)
  records.py   raw record -> 8-bit RGB S x S pixels + caption, or a skip reason (the list of reasons)
  encode.py    pixels -> VAE latents (jitted, batched over this process's devices) / pixels / PNG bytes
  shards.py    one ArrayRecord shard per input shard, committed atomically; the TFDS metadata

Work: input shard k becomes output shard k; process p of P takes shards p, p + P, ... (after
`training.distributed.initialize`). A committed shard is skipped on restart, so a killed run, restarted,
writes each record once. The counts of every shard are gathered over processes
(`evaluation.distributed.gather_json`), and process 0, after all shards are written, writes the metadata
(shard lengths, counts, the record fields) once. 2 processes give the records, and bitwise the latents, of 1
(with the same --batch-size and devices per process: a record's latent depends on its input shard's batches).

Records (encode "vae": --vae-dir given; "pixels": no VAE; "none": --encode none):
  vae / pixels  {"caption", "latent": float32 [S/f, S/f, C] (pixels: [S, S, 3] in [-1, 1]), "id"}: build-data's
                format, config "res{S}"
  none          {"caption", "image": PNG of the S x S 8-bit RGB image (uint8 [S, S, 3] when read), "id"},
                config "png{S}": train on it with --config.data.encode=online (training.online_encoding)
Test hook: with LMFUSION_PREPARE_DATA_KILL_AFTER=N in the environment the process SIGKILLs itself once N records
have gone to a (temporary) shard file.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from etils import epath

from lmfusion_jax.data.prepare import shards as shard_io
from lmfusion_jax.data.prepare.encode import Encoder
from lmfusion_jax.data.prepare.records import process
from lmfusion_jax.data.prepare.sources import FORMATS, input_shards, read_shard
from lmfusion_jax.errors import UserError

KILL_ENV = "LMFUSION_PREPARE_DATA_KILL_AFTER"
ENCODE = ("vae", "none")


def _vae_files(vae_dir) -> dict:
  p = epath.Path(vae_dir) / "params.safetensors"
  return {"vae_dir": os.fspath(vae_dir), "vae_params_bytes": p.stat().length if p.exists() else None}


def _chunks(iterable, n: int):
  it = iter(iterable)
  while chunk := list(itertools.islice(it, n)):
    yield chunk


class _Run:
  """One process's part of a prepare-data run."""

  def __init__(self, shards, num_shards, ds_dir, encoder, size, caption_field, image_field, workers, progress):
    self.shards, self.num_shards, self.ds_dir, self.encoder, self.size = shards, num_shards, ds_dir, encoder, size
    self.caption_field, self.image_field = caption_field, image_field
    self.pool = ThreadPoolExecutor(max_workers=workers)
    self.progress = progress
    self.features = encoder.features
    self.kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    self.sent = 0

  def _examples(self, shard, skipped: collections.Counter):
    """(id, example) of one input shard, in order; the skipped records are counted in `skipped`."""
    ids, captions, pixels = [], [], []

    def flush():
      import numpy as np
      for rid, example in self.encoder.encode(ids, captions, np.stack(pixels)):
        if example is None:
          skipped["nonfinite_latent"] += 1
          continue
        if self.kill_after and self.sent >= self.kill_after:
          os.kill(os.getpid(), signal.SIGKILL)
        self.sent += 1
        yield rid, example
      ids.clear(), captions.clear(), pixels.clear()

    for chunk in _chunks(read_shard(shard, self.caption_field, self.image_field), 4 * self.encoder.batch_size):
      for raw in chunk:
        if raw.reason == "shard_error":
          print(f"prepare-data: warning: {shard.name}: cannot be read to its end ({raw.error}); the records "
                f"before the damage are kept", file=sys.stderr, flush=True)
      for rid, caption, px, why in self.pool.map(lambda r: process(r, self.size), chunk):
        self.progress.update(1)
        if why:
          skipped[why] += 1
          continue
        ids.append(rid), captions.append(caption), pixels.append(px)
        if len(ids) == self.encoder.batch_size:
          yield from flush()
    if ids:
      yield from flush()

  def shard(self, shard) -> dict:
    skipped = collections.Counter()
    counts = shard_io.write_shard(self.ds_dir, shard.index, self.num_shards, shard.name,
                                  self._examples(shard, skipped), self.features)
    counts["skipped"] = dict(sorted(skipped.items()))
    shard_io.commit_counts(self.ds_dir, counts)
    return counts

  def run(self) -> dict:
    """{input shard index: its counts} of this process's shards (written now or by an earlier run)."""
    out = {s.index: shard_io.done_counts(self.ds_dir, s.index) for s in self.shards}
    todo = [s for s in self.shards if out[s.index] is None]
    exact = bool(todo) and todo[0].fmt == "folder"
    if exact:
      self.progress.total = sum(s.stop - s.start for s in todo)
    with self.pool:
      for k, shard in enumerate(todo, start=1):
        out[shard.index] = self.shard(shard)
        if not exact:   # estimated from the shards this run has written so far
          self.progress.total = self.progress.n + self.progress.n / k * (len(todo) - k)
        self.progress.set_postfix(shards=f"{len(self.shards) - len(todo) + k}/{len(self.shards)}")
    return out


def _summary(every: dict, num_shards: int) -> dict:
  missing = [i for i in range(num_shards) if i not in every]
  if missing:
    raise RuntimeError(f"prepare-data: input shard {missing[0]} was written by no process ({len(missing)} missing)")
  skipped = collections.Counter()
  for c in every.values():
    skipped.update(c["skipped"])
  return {"written": sum(int(c["records"]) for c in every.values()), "skipped": dict(sorted(skipped.items()))}


def prepare_data(source: str, fmt: str, out: str, image_size: int, *, vae_dir: Optional[str] = None,
                 encode: str = "vae", caption_field: Optional[str] = None, image_field: Optional[str] = None,
                 batch_size: int = 16, config_name: Optional[str] = None, shard_size: int = 1000,
                 workers: Optional[int] = None) -> dict:
  """Prepares (or finishes preparing) the dataset; every process of the job calls it. Returns
  {"written", "skipped": {reason: count}, "dataset_dir", "config_name", "num_shards", "latent_shape"}."""
  import jax
  from lmfusion_jax.evaluation import distributed as dist
  from lmfusion_jax.progress import Progress
  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r}: not one of {FORMATS}")
  if encode not in ENCODE:
    raise UserError(f"--encode {encode!r}: not one of {ENCODE}")
  if encode == "none" and vae_dir:
    raise UserError("--vae-dir has no use with --encode none (the images are stored, not encoded)")
  if image_size < 1 or batch_size < 1 or shard_size < 1:
    raise UserError(f"image size {image_size}, batch size {batch_size} and shard size {shard_size} must be >= 1")
  if caption_field is not None and fmt == "folder":
    raise UserError("--caption-field has no use with --format folder (captions.jsonl / csv name the caption)")
  if image_field is not None and fmt != "parquet":
    raise UserError("--image-field is for --format parquet")
  shards = input_shards(source, fmt, shard_size)
  mode = "none" if encode == "none" else ("vae" if vae_dir else "pixels")
  encoder = Encoder(mode, image_size, vae_dir, batch_size)
  name = config_name or (f"png{image_size}" if mode == "none" else f"res{image_size}")
  ds_dir = shard_io.dataset_dir(out, name)
  options = {"format": fmt, "sources": [s.name for s in shards], "caption_field": caption_field,
             "image_field": image_field, "shard_size": shard_size if fmt == "folder" else None,
             **encoder.describe(), **(_vae_files(vae_dir) if vae_dir else {})}
  fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
  shard_io.check_options(ds_dir, options, write=jax.process_index() == 0)
  dist.barrier("prepare-data: options")
  with Progress(None, "prepare-data", unit="image") as progress:
    mine = _Run(dist.share(shards), len(shards), ds_dir, encoder, image_size, caption_field, image_field,
                workers or min(8, os.cpu_count() or 1), progress).run()
    progress.set_postfix(written=sum(int(c["records"]) for c in mine.values()))
  every = {int(k): v for k, v in dist.gather_json(mine).items()}
  summary = _summary(every, len(shards))
  if jax.process_index() == 0 and not (ds_dir / "dataset_info.json").exists():
    metadata = {"fingerprint": fingerprint, "prepared_by": "lmfusion-jax prepare-data", "encode": mode,
                "fields": encoder.fields(), "source": source, "format": fmt, "image_size": image_size,
                "vae_dir": vae_dir, "num_shards": len(shards), **summary}
    shard_io.write_metadata(ds_dir, name, encoder.features, [every[i] for i in range(len(shards))], metadata,
                            description=__doc__)
  dist.barrier("prepare-data: metadata")
  return {**summary, "dataset_dir": os.fspath(ds_dir), "config_name": name, "num_shards": len(shards),
          "latent_shape": list(encoder.latent_shape), "encode": mode}
