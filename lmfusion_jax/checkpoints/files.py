"""Files and folders that are complete or absent, and the one error a checkpoint reader raises.

Every writer of the package goes through these: a file is written to a temporary sibling and renamed over
its target; a folder is filled under a temporary sibling name and renamed into place, and on any error the
temporary is removed and a replaced folder put back. Paths are `etils.epath` paths (local or gs://).
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Callable

from etils import epath

from lmfusion_jax.errors import UserError


class CheckpointError(UserError):
  """A checkpoint (params, training, VAE) is missing, incomplete or does not match what it is read as; the
  message names the path and the file, field or tensor at fault."""


def absolute_path(path) -> str:
  """A local path made absolute (`~` expanded) against the current directory; URLs (gs://...) untouched.
  Every path a user gives is passed through this at the boundary, so what is stored and handed to orbax
  stays valid from any directory."""
  text = os.fspath(path)
  if not text or "://" in text:
    return text
  return os.path.abspath(os.path.expanduser(text))


def missing_or_empty(folder, names) -> list:
  """The `names` (relative paths) absent under `folder`, or empty files: what names a damaged checkpoint."""
  folder = epath.Path(folder)
  return [n for n in names if not (folder / n).exists() or
          (not (folder / n).is_dir() and (folder / n).stat().length == 0)]


class OutputExistsError(UserError):
  """An output path exists and the caller did not ask to replace it."""


def _tmp_sibling(path: epath.Path, kind: str) -> epath.Path:
  return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def write_bytes(path, data: bytes) -> epath.Path:
  """Writes `data` to `path` atomically (creating the parent folder)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(path, "tmp")
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return path


def write_text(path, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int = 2, sort_keys: bool = True) -> epath.Path:
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_dir(out_dir, fill: Callable[[epath.Path], None], overwrite: bool = False) -> epath.Path:
  """Calls fill(tmp_dir), then renames tmp_dir to `out_dir`; nothing is left behind on failure, and an
  existing `out_dir` (only replaced with `overwrite`) is put back."""
  out_dir = epath.Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise OutputExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp, old = _tmp_sibling(out_dir, "tmp"), _tmp_sibling(out_dir, "old")
  try:
    tmp.mkdir()
    fill(tmp)
    if out_dir.exists():
      out_dir.rename(old)
    tmp.rename(out_dir)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    if old.exists() and not out_dir.exists():
      old.rename(out_dir)
    raise
  if old.exists():
    old.rmtree()
  return out_dir


# The files of a Hugging Face tokenizer folder (whichever exist are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def has_tokenizer(folder) -> bool:
  folder = epath.Path(folder)
  return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def copy_tokenizer_files(source, target) -> int:
  """Copies the TOKENIZER_FILES present in `source` into `target` (created); returns how many."""
  source, target = epath.Path(source), epath.Path(target)
  target.mkdir(parents=True, exist_ok=True)
  n = 0
  for name in TOKENIZER_FILES:
    if (source / name).exists():
      (target / name).write_bytes((source / name).read_bytes())
      n += 1
  return n
