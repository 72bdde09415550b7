"""Shared timing helpers for the benchmark scripts.

`timed` times one function alone (median after a warm-up). `interleaved` compares two sides fairly on a shared,
drifting machine: after warm-ups it measures them in pairs, alternating which side goes first (A B, B A, A B,
...), and reports the ratio of each pair, so load that changes between pairs cancels out of the ratios.
`machine`, `loadavg` and `command` describe where and how a figure was measured.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import statistics
import sys
import time
from typing import Callable


def timed(fn, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` runs, after one warm-up run (JAX compiles there)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def wall(fn) -> Callable[[], float]:
  """A measurement for `interleaved`: the wall time in seconds of one `fn()` call."""
  def measure() -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
  return measure


@dataclasses.dataclass
class Paired:
  """Per-pair measurements of two sides and their ratios a / b (one per pair, same order)."""
  a: list[float]
  b: list[float]
  warmup: int

  @property
  def ratios(self) -> list[float]:
    return [x / y for x, y in zip(self.a, self.b)]

  @property
  def pairs(self) -> int:
    return len(self.a)

  @property
  def median_a(self) -> float:
    return statistics.median(self.a)

  @property
  def median_b(self) -> float:
    return statistics.median(self.b)

  @property
  def median_ratio(self) -> float:
    return statistics.median(self.ratios)

  @property
  def ratio_range(self) -> tuple[float, float]:
    return min(self.ratios), max(self.ratios)

  def summary(self, a: str, b: str, fmt: str = ".2f") -> str:
    """One line: the per-pair ratio a / b (median, range, median by which side went first), how it was measured."""
    lo, hi = self.ratio_range
    r = self.ratios
    by_order = ""
    if self.pairs >= 2:
      by_order = (f"; median {statistics.median(r[0::2]):{fmt}} in the pairs {a} went first, "
                  f"{statistics.median(r[1::2]):{fmt}} in those {b} went first")
    return (f"{a} / {b}: median {self.median_ratio:{fmt}} of {self.pairs} per-pair ratios, range "
            f"{lo:{fmt}}-{hi:{fmt}}{by_order} ({self.pairs} interleaved pairs, {a} first in odd pairs and {b} "
            f"first in even ones, after {self.warmup} warm-up run(s) per side)")

  def per_pair(self, a: str, b: str, scale: float = 1e3, unit: str = "ms") -> str:
    """One line: each pair's a, b and ratio in measurement order (`*` marks the pairs where a went first)."""
    cells = [f"{'*' if i % 2 == 0 else ''}{x * scale:.0f}/{y * scale:.0f}={x / y:.2f}"
             for i, (x, y) in enumerate(zip(self.a, self.b))]
    return f"per pair, {a}/{b} {unit} = ratio (* = {a} first): " + ", ".join(cells)


def interleaved(measure_a: Callable[[], float], measure_b: Callable[[], float], pairs: int,
                warmup: int = 1) -> Paired:
  """Measures two sides in `pairs` adjacent pairs, alternating which goes first, after `warmup` runs of each.

  `measure_a` / `measure_b` each run their side once and return the measured quantity (e.g. `wall(fn)`, or a
  derived cost such as seconds per step); the ratio of each pair is a / b.
  """
  if pairs < 1:
    raise ValueError(f"pairs must be >= 1, got {pairs}")
  for _ in range(warmup):
    measure_a()
    measure_b()

  a, b = [], []
  for i in range(pairs):
    if i % 2 == 0:
      a.append(measure_a())
      b.append(measure_b())
    else:
      b.append(measure_b())
      a.append(measure_a())
  return Paired(a, b, warmup)


def command() -> str:
  """The command line that ran this script (as typed relative to the repository root when run from there)."""
  return "python " + " ".join(shlex.quote(x) for x in sys.argv)


def loadavg() -> str:
  """The 1-minute load average now (how busy the shared machine is), or "?" where unavailable."""
  return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def machine() -> str:
  """nproc (CPUs this process may use), the CPU model and today's date."""
  try:
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
  except (OSError, StopIteration):
    model = "unknown CPU"
  nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"nproc {nproc}, {model}, {datetime.date.today().isoformat()}"
