"""prepare-data's inputs: a source pattern -> input shards -> raw records (image bytes + caption bytes).

  input_shards(source, fmt, shard_size) -> [Shard]     every process lists the same shards, in the same order
  read_shard(shard, caption_field, image_field) -> iterator of Raw

Formats:
  webdataset  .tar shards (img2dataset layout: key.jpg|jpeg|png|webp + key.txt, optional key.json), read with
              webdataset's tar iterators (grouped by key). The caption is key.txt, or with --caption-field F
              the field F of key.json. Record id: "<shard file name>/<key>".
  parquet     read with pyarrow, a row group batch at a time. Image column: --image-field, else the first of
              jpg, jpeg, png, webp, image, image.bytes, img (binary, or a struct with a `bytes` field: the
              Hugging Face datasets layout); caption column: --caption-field (default `caption`), string or
              binary. Record id: "<file name>/<row>".
  folder      images + captions.jsonl / captions.csv, read with build-data's reader
              (data.tfds_image_captions); input shard k is records [k * shard_size, (k + 1) * shard_size) of
              the captions file. Record id: the file (as build-data). A malformed captions file stops the run
              naming the line, as build-data does.
Sources: a brace pattern (`shards/{00000..00099}.tar`, expanded with braceexpand) and/or glob wildcards
(local paths; on gs:// and other remote stores in the last path component only). Expanded in brace order,
each glob's matches sorted; a name without wildcards must exist.

A record the reader can already judge carries its skip reason (missing_image, missing_caption,
outside_source, duplicate); the rest (decoding, caption checks) is done by `records.py`. A shard that cannot be
read to its end (a truncated or corrupt tar / parquet file; an uncompressed .tar whose size is not whole
512-byte blocks) yields what came before the damage plus one Raw with reason `shard_error` and the error text.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Iterator, List, Optional

from etils import epath

from lmfusion_jax.errors import UserError

FORMATS = ("webdataset", "parquet", "folder")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image.bytes", "img")
DEFAULT_PARQUET_CAPTION = "caption"
WILDCARDS = set("*?[")


@dataclasses.dataclass(frozen=True)
class Shard:
  """One input shard: a file (webdataset, parquet) or a slice [start, stop) of a folder's captions file."""
  index: int
  path: str
  fmt: str
  start: int = 0
  stop: int = 0

  @property
  def name(self) -> str:
    if self.fmt == "folder":
      return f"{self.path}[{self.start}:{self.stop}]"
    return self.path


@dataclasses.dataclass
class Raw:
  id: str
  image: Optional[bytes] = None
  caption: object = None          # str, bytes (decoded later) or None (missing)
  reason: Optional[str] = None    # a skip reason known while reading
  error: str = ""                 # for reason shard_error: what went wrong


def _expand_braces(pattern: str) -> List[str]:
  import braceexpand
  return list(braceexpand.braceexpand(pattern))


def _glob(pattern: str) -> List[str]:
  if not WILDCARDS & set(pattern):
    if not epath.Path(pattern).exists():
      raise UserError(f"--source {pattern}: no such file")
    return [pattern]
  if "://" not in pattern:
    return sorted(glob.glob(pattern))
  parent, last = pattern.rsplit("/", 1)
  if WILDCARDS & set(parent):
    raise UserError(f"--source {pattern}: on remote storage only the last path component may hold wildcards")
  return sorted(os.fspath(p) for p in epath.Path(parent).glob(last))


def expand_pattern(source: str) -> List[str]:
  """The files a brace / glob pattern names, in order, each once."""
  out, seen = [], set()
  for pattern in _expand_braces(source):
    for path in _glob(pattern):
      if path not in seen:
        seen.add(path)
        out.append(path)
  if not out:
    raise UserError(f"--source {source}: matches no file")
  return out


@functools.lru_cache(maxsize=2)
def _folder_index(source_dir: str) -> tuple:
  """([(line, file, caption)] of a folder's captions.jsonl / captions.csv (build-data's reader), {file: index
  of its first record}), read once per process."""
  from lmfusion_jax.data.tfds_image_captions import _read_records
  _, records = _read_records(epath.Path(source_dir))
  first = {}
  for i, (_, file, _) in enumerate(records):
    first.setdefault(file, i)
  return records, first


def input_shards(source: str, fmt: str, shard_size: int = 1000) -> List[Shard]:
  """The input shards of `source` in `fmt` (see the module docstring), numbered from 0."""
  if fmt not in FORMATS:
    raise UserError(f"--format {fmt!r}: not one of {FORMATS}")
  if fmt != "folder":
    return [Shard(i, p, fmt) for i, p in enumerate(expand_pattern(source))]
  if not epath.Path(source).is_dir():
    raise UserError(f"--source {source}: not a folder (--format folder reads a folder with captions.jsonl or "
                    f"captions.csv)")
  n = len(_folder_index(source)[0])
  if n == 0:
    raise UserError(f"--source {source}: the captions file lists no images")
  return [Shard(k, source, fmt, start, min(start + shard_size, n))
          for k, start in enumerate(range(0, n, shard_size))]


def _shard_error(shard: Shard, e: BaseException) -> Raw:
  return Raw(id=f"{os.path.basename(shard.path)}/", reason="shard_error", error=f"{type(e).__name__}: {e}")


def _webdataset(shard: Shard, caption_field: Optional[str]) -> Iterator[Raw]:
  from webdataset import tariterators
  errors: list = []

  def stop(exn):   # webdataset's handler protocol: False = stop reading this shard
    errors.append(exn)
    return False

  base = os.path.basename(shard.path)
  with epath.Path(shard.path).open("rb") as stream:
    files = tariterators.tar_file_expander([{"url": shard.path, "stream": stream}], handler=stop)
    for sample in tariterators.group_by_keys(files, handler=stop):
      rid = f"{base}/{sample['__key__']}"
      image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
      if image is None:
        yield Raw(rid, reason="missing_image")
        continue
      if caption_field is None:
        caption = sample.get("txt")
      else:
        caption = _json_field(sample.get("json"), caption_field)
      yield Raw(rid, image=image, caption=caption)
  size = epath.Path(shard.path).stat().length
  if not errors and shard.path.endswith(".tar") and size % 512:
    # tarfile ends quietly at a header cut short; an uncompressed tar is whole 512-byte blocks
    errors.append(EOFError(f"{size} bytes is not a whole number of 512-byte tar blocks: the file is truncated"))
  for e in errors[:1]:
    yield _shard_error(shard, e)


def _json_field(data: Optional[bytes], field: str):
  """The caption in a record's JSON member: bytes that fail UTF-8 are returned as they are (non_utf8_caption
  later); no member, invalid JSON, no such field, null or a non-string value -> None (missing_caption)."""
  if data is None:
    return None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return data
  try:
    obj = json.loads(text)
  except json.JSONDecodeError:
    return None
  value = obj.get(field) if isinstance(obj, dict) else None
  return value if isinstance(value, str) else None


def _parquet_columns(schema, path: str, caption_field: Optional[str], image_field: Optional[str]):
  """(image column, is_struct, caption column) of a parquet file, or UserError naming what is missing."""
  import pyarrow as pa
  names = list(schema.names)
  caption = caption_field or DEFAULT_PARQUET_CAPTION
  if caption not in names:
    raise UserError(f"{path}: no caption column {caption!r} (columns: {names}; choose one with --caption-field)")
  candidates = [image_field] if image_field else [c for c in PARQUET_IMAGE_COLUMNS if c in names]
  if not candidates or candidates[0] not in names:
    raise UserError(f"{path}: no image column {image_field or ' / '.join(PARQUET_IMAGE_COLUMNS)} "
                    f"(columns: {names}; choose one with --image-field)")
  col = candidates[0]
  typ = schema.field(col).type
  if pa.types.is_struct(typ):
    if typ.get_field_index("bytes") < 0:
      raise UserError(f"{path}: image column {col!r} is a struct without a 'bytes' field ({typ})")
    return col, True, caption
  if not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
    raise UserError(f"{path}: image column {col!r} holds {typ}, expected binary image bytes")
  return col, False, caption


def _parquet(shard: Shard, caption_field: Optional[str], image_field: Optional[str]) -> Iterator[Raw]:
  import pyarrow.parquet as pq
  base = os.path.basename(shard.path)
  with epath.Path(shard.path).open("rb") as f:
    try:
      pf = pq.ParquetFile(f)
      schema = pf.schema_arrow
    except Exception as e:  # pylint: disable=broad-except  # not a parquet file, truncated footer, ...
      yield _shard_error(shard, e)
      return
    image_col, is_struct, caption_col = _parquet_columns(schema, shard.path, caption_field, image_field)
    row = 0
    try:
      for batch in pf.iter_batches(batch_size=256, columns=[image_col, caption_col]):
        images = batch.column(image_col)
        if is_struct:
          images = images.field("bytes")
        for image, caption in zip(images.to_pylist(), batch.column(caption_col).to_pylist()):
          rid = f"{base}/{row}"
          row += 1
          yield Raw(rid, image=image, caption=caption) if image is not None else Raw(rid, reason="missing_image")
    except Exception as e:  # pylint: disable=broad-except  # a corrupt page: keep the rows before it
      yield _shard_error(shard, e)


def _folder(shard: Shard) -> Iterator[Raw]:
  from lmfusion_jax.data.tfds_image_captions import _escapes
  root = epath.Path(shard.path)
  records, first = _folder_index(shard.path)
  for i in range(shard.start, shard.stop):
    _, file, caption = records[i]
    if first[file] != i:
      yield Raw(file, reason="duplicate")
    elif _escapes(root, file):
      yield Raw(file, reason="outside_source")
    else:
      try:
        image = (root / file).read_bytes()
      except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        yield Raw(file, reason="missing_image")
        continue
      yield Raw(file, image=image, caption=caption)


def read_shard(shard: Shard, caption_field: Optional[str] = None, image_field: Optional[str] = None
               ) -> Iterator[Raw]:
  """The raw records of one input shard, in order."""
  if shard.fmt == "webdataset":
    return _webdataset(shard, caption_field)
  if shard.fmt == "parquet":
    return _parquet(shard, caption_field, image_field)
  return _folder(shard)
