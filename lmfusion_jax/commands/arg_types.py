"""argparse `type=` helpers that refuse bad flag values at parse time.

argparse turns an `ArgumentTypeError` into `lmfusion-jax CMD: error: argument --FLAG: MESSAGE` and exit 2,
so a bad value is reported, with its flag, before anything is loaded or computed.

  p.add_argument("--steps", type=positive_int)
  p.add_argument("--top-p", type=probability)
"""
from __future__ import annotations

import argparse
import math
import os


def _int(text: str) -> int:
  try:
    return int(text)
  except (TypeError, ValueError):
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1."""
  value = _int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return value


def non_negative_int(text: str) -> int:
  """An integer >= 0."""
  value = _int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return value


def finite_float(text: str) -> float:
  """Any finite number (no nan / inf)."""
  return _float(text)


def non_negative_float(text: str) -> float:
  """A finite number >= 0."""
  value = _float(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
  return value


def unit_interval(text: str) -> float:
  """A number in [0, 1]."""
  value = _float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
  return value


def probability(text: str) -> float:
  """A probability mass in (0, 1] (e.g. nucleus sampling's top-p: 0 would keep no token)."""
  value = _float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
  return value


def non_empty_str(text: str) -> str:
  """A string that is not empty or only whitespace."""
  if not text.strip():
    raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
  return text


def output_file(text: str) -> str:
  """A file path to write: not an existing folder, and no existing file where a parent folder must be
  (missing parent folders are created when the file is written). Remote paths (gs://...) are not checked."""
  if not text.strip():
    raise argparse.ArgumentTypeError("must not be empty")
  if "://" in text:
    return text
  path = os.path.abspath(text)
  if os.path.isdir(path):
    raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path inside it")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(f"cannot write {text!r}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {parent} is not writable")
  return text
