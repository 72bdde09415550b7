"""prepare-data's output: one ArrayRecord shard per input shard, committed atomically, and the TFDS metadata.

Layout (the one build-data writes, so `train --config.data.dataset=image_captions` and
`tfds_image_captions.image_captions_reader` read it unchanged):
  OUT/lmfusion_image_captions/CONFIG/1.0.0/
    lmfusion_image_captions-train.array_record-0000k-of-0000N   output shard k = input shard k (may be empty)
    dataset_info.json, features.json, metadata.json              written once, last (dataset_info.json last)
    prepare/options.json                                         what the run was started with
    prepare/shard-0000k.json                                     shard k's counts: its commit marker

A shard is written under a temporary name (a hidden sibling; on remote storage a local file copied there) and
renamed into place, then its counts file is written (atomically): a shard with a counts file is done and
skipped on restart; one without is written again from the start (its leftover temporaries removed first).
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid

from etils import epath

from lmfusion_jax.checkpoints.files import write_json
from lmfusion_jax.data.tfds_image_captions import BUILDER_NAME, VERSION, _dataset_dir
from lmfusion_jax.errors import UserError

SPLIT = "train"
STATE_DIR = "prepare"
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def dataset_dir(out, config_name: str) -> epath.Path:
  return _dataset_dir(out, config_name)


def _template(ds_dir: epath.Path):
  from tensorflow_datasets.core import naming
  return naming.ShardedFileTemplate(data_dir=ds_dir, template=TEMPLATE, dataset_name=BUILDER_NAME, split=SPLIT,
                                    filetype_suffix="array_record")


def shard_path(ds_dir: epath.Path, index: int, num_shards: int) -> epath.Path:
  return epath.Path(_template(ds_dir).sharded_filepath(shard_index=index, num_shards=num_shards))


def counts_path(ds_dir: epath.Path, index: int) -> epath.Path:
  return ds_dir / STATE_DIR / f"shard-{index:05d}.json"


def done_counts(ds_dir: epath.Path, index: int):
  """Shard `index`'s counts when it is committed (its counts file and its shard exist), else None."""
  p = counts_path(ds_dir, index)
  if not p.exists():
    return None
  counts = json.loads(p.read_text())
  return counts if shard_path(ds_dir, index, counts["num_shards"]).exists() else None


def check_options(ds_dir: epath.Path, options: dict, write: bool) -> None:
  """Refuses an OUT that holds another dataset or a run started with other options; records `options` (on
  one process: `write`) when the run is new."""
  path = ds_dir / STATE_DIR / "options.json"
  if path.exists():
    stored = json.loads(path.read_text())
    diff = sorted(k for k in set(stored) | set(options) if stored.get(k) != options.get(k))
    if diff:
      raise UserError(f"{ds_dir} was started with other options ({', '.join(diff)} differ); use another --out "
                      f"or --config-name, or delete it")
    return
  if (ds_dir / "dataset_info.json").exists():
    raise UserError(f"{ds_dir} holds a dataset prepare-data did not write (build-data?); use another --out or "
                    f"--config-name")
  if write:
    write_json(path, options)


def _remove_temporaries(final: epath.Path) -> None:
  for p in final.parent.glob(f".{final.name}.tmp-*"):
    p.unlink()


def write_shard(ds_dir: epath.Path, index: int, num_shards: int, source: str, examples, features) -> dict:
  """Writes the (id, example dict) pairs of `examples` as shard `index` (a temporary, then renamed into place);
  returns {"shard", "num_shards", "source", "records", "num_bytes"}. The shard counts as done only once the
  caller has added its skip counts and written them with `commit_counts`."""
  from tensorflow_datasets.core import file_adapters
  final = shard_path(ds_dir, index, num_shards)
  final.parent.mkdir(parents=True, exist_ok=True)
  _remove_temporaries(final)
  tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
  remote = "://" in os.fspath(ds_dir)
  stats = {"records": 0, "num_bytes": 0}

  def serialized():
    for _, example in examples:
      data = features.serialize_example(example)
      stats["records"] += 1
      stats["num_bytes"] += len(data)
      yield None, data

  local_dir = tempfile.mkdtemp(prefix="prepare-data-") if remote else None
  local = os.path.join(local_dir, "shard") if remote else os.fspath(tmp)
  try:
    file_adapters.ArrayRecordFileAdapter.write_examples(local, serialized())
    if remote:
      epath.Path(local).copy(tmp)
    tmp.rename(final)
  finally:
    if tmp.exists():
      tmp.unlink()
    if local_dir:
      epath.Path(local_dir).rmtree()
  return {"shard": index, "num_shards": num_shards, "source": source, **stats}


def commit_counts(ds_dir: epath.Path, counts: dict) -> None:
  write_json(counts_path(ds_dir, counts["shard"]), counts)


def write_metadata(ds_dir: epath.Path, config_name: str, features, shard_counts: list, metadata: dict,
                   description: str) -> None:
  """dataset_info.json, features.json and metadata.json for the committed shards (in shard order), written
  into a temporary folder and moved into place with dataset_info.json last (what makes the dataset readable)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_info, splits as split_lib
  identity = dataset_info.DatasetIdentity(
      name=BUILDER_NAME, version=tfds.core.Version(VERSION), data_dir=os.fspath(ds_dir),
      module_name="lmfusion_jax.data.prepare", config_name=config_name,
      config_description=f"fingerprint={metadata.get('fingerprint', '')}")
  info = dataset_info.DatasetInfo(builder=identity, features=features, description=description,
                                  metadata=tfds.core.MetadataDict(**metadata))
  info.set_file_format("array_record")
  split = split_lib.SplitInfo(name=SPLIT, shard_lengths=[int(c["records"]) for c in shard_counts],
                              num_bytes=sum(int(c["num_bytes"]) for c in shard_counts),
                              filename_template=_template(ds_dir))
  info.set_splits(split_lib.SplitDict([split]))
  tmp = ds_dir / f".metadata.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    info.write_to_directory(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "dataset_info.json"] + ["dataset_info.json"]:
      (tmp / name).replace(ds_dir / name)
  finally:
    tmp.rmtree()
