"""The .jsonl files evaluations read (prompts, references): one JSON object a line, blank lines skipped, local or
gs://. Every error is a UserError naming the flag, the file and the line."""
from __future__ import annotations

import json
from typing import Callable, Iterator, Type

from etils import epath

from lmfusion_jax.checkpoints.files import absolute_path
from lmfusion_jax.errors import UserError


def json_lines(flag: str, path, error: Type[UserError] = UserError) -> Iterator[tuple[int, str, object]]:
  """(line number, line, parsed JSON value) of every non-blank line of `path`."""
  path = absolute_path(path)
  try:
    lines = epath.Path(path).read_bytes().decode("utf-8").splitlines()
  except FileNotFoundError:
    raise error(f"{flag} {path}: no such file") from None
  except UnicodeDecodeError as e:
    raise error(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      yield n, line, json.loads(line)
    except json.JSONDecodeError as e:
      raise error(f"{flag} {path}:{n}: not a JSON object ({e.msg} at column {e.colno}): {line[:80]!r}") from None


def read_records(flag: str, path, parse: Callable[[object], object], expected: str,
                 error: Type[UserError] = UserError) -> list:
  """[parse(value)] for every line; `parse` returns None for a value that does not have the expected form,
  which is then refused naming the line and `expected`. An empty file is refused too."""
  out = []
  for n, line, value in json_lines(flag, path, error):
    record = parse(value)
    if record is None:
      raise error(f"{flag} {absolute_path(path)}:{n}: needs {expected}, got {line[:80]!r}")
    out.append(record)
  if not out:
    raise error(f"{flag} {absolute_path(path)}: no records in it")
  return out
