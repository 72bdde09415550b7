"""Progress of long jobs with rate and ETA: a redrawn bar on a terminal, plain lines in logs.

  with Progress(total=50, desc="sample", unit="step") as p:
    for ...:
      p.update(1, loss=0.123)

On a TTY one line is redrawn (at most every `min_interval_s`, default 0.1 s):
  sample [#########---------------] 19/50 3.4 step/s ETA 0:00:09 loss=0.123
Otherwise (a log file, CI) a plain line is printed at most every `min_interval_s` (default 10 s), and always
a final line with the total time. Only process 0 of a multi-process JAX job prints (by default). Pure Python;
the clock is injectable for tests. `initial` is the work done before this run (a resumed training run starts
at its checkpoint's step): the rate and ETA count only what this run did.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

BAR_WIDTH = 24
TTY_INTERVAL_S = 0.1
LOG_INTERVAL_S = 10.0


def default_enabled() -> bool:
  """True unless JAX is already imported, its backends are up and this is not process 0 (never imports JAX,
  nor starts a backend: that would come before jax.distributed.initialize)."""
  if "jax" not in sys.modules:
    return True
  try:
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
      return True
    import jax
    return jax.process_index() == 0
  except Exception:  # pylint: disable=broad-except
    return True


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _format_count(x) -> str:
  return f"{x:.1f}" if isinstance(x, float) and not x.is_integer() else f"{int(x)}"


def _format_value(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _format_rate(rate: float, unit: str) -> str:
  if rate >= 100:
    return f"{rate:.0f} {unit}/s"
  if rate >= 1:
    return f"{rate:.2f} {unit}/s"
  if rate > 0:
    return f"{1 / rate:.2f} s/{unit}"
  return f"- {unit}/s"


class Progress:
  """Counts work done (`update`) and reports it with rate and ETA; a context manager (the final line on exit).

  total: the work to do (None: unknown; no bar nor ETA); desc: what is counted; unit: its unit ("it",
  "step", "batch", "MiB": any float amount is fine); stream: where to write (default stderr); min_interval_s:
  least time between reports (default 0.1 s on a TTY, 10 s otherwise); enabled: print at all (default: only
  JAX process 0); initial: work already done before this run (resume); clock: seconds, monotonic; tty: force
  the mode (default: stream.isatty()).
  """

  def __init__(self, total: Optional[float], desc: str, unit: str = "it", stream: Optional[TextIO] = None,
               min_interval_s: Optional[float] = None, enabled: Optional[bool] = None, initial: float = 0,
               clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None):
    self.total = total
    self.desc = desc
    self.unit = unit
    self.stream = sys.stderr if stream is None else stream
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
    self.min_interval_s = (TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S) if min_interval_s is None \
        else min_interval_s
    self.enabled = default_enabled() if enabled is None else enabled
    self.clock = clock
    self.initial = initial
    self.n = initial
    self.postfix: dict = {}
    self.start = clock()
    self._last_report = self.start
    self._width = 0
    self.closed = False

  # counting
  def update(self, n: float = 1, **postfix) -> None:
    """Adds `n` units done; `postfix` (e.g. loss=...) replaces the shown values of those keys."""
    self.n += n
    self.postfix.update(postfix)
    now = self.clock()
    if self.enabled and not self.closed and now - self._last_report >= self.min_interval_s:
      self._report(now, final=False)

  def set_postfix(self, **postfix) -> None:
    self.postfix.update(postfix)

  @property
  def elapsed(self) -> float:
    return self.clock() - self.start

  def rate(self, now: Optional[float] = None) -> float:
    """Units per second done by this run (excluding `initial`); 0 before any time has passed."""
    dt = (self.clock() if now is None else now) - self.start
    return (self.n - self.initial) / dt if dt > 0 else 0.0

  def eta(self, now: Optional[float] = None) -> Optional[float]:
    """Seconds left at the current rate; None when the total or the rate is unknown."""
    rate = self.rate(now)
    if self.total is None or rate <= 0:
      return None
    return max(0.0, self.total - self.n) / rate

  # reporting
  def line(self, now: Optional[float] = None, final: bool = False) -> str:
    now = self.clock() if now is None else now
    parts = [self.desc] if self.desc else []
    if self.total is not None and self.tty and not final:
      frac = min(1.0, max(0.0, self.n / self.total)) if self.total > 0 else 1.0
      filled = int(round(frac * BAR_WIDTH))
      parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
    count = _format_count(self.n) + (f"/{_format_count(self.total)}" if self.total is not None else "")
    parts.append(count if self.unit == "it" else f"{count} {self.unit}")
    parts.append(_format_rate(self.rate(now), self.unit))
    if final:
      parts.append(f"in {format_duration(now - self.start)}")
    else:
      eta = self.eta(now)
      if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    parts.extend(f"{k}={_format_value(v)}" for k, v in self.postfix.items())
    return " ".join(parts)

  def _report(self, now: float, final: bool) -> None:
    self._last_report = now
    text = self.line(now, final=final)
    if self.tty:
      pad = " " * max(0, self._width - len(text))
      self._width = len(text)
      self.stream.write("\r" + text + pad + ("\n" if final else ""))
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def close(self) -> None:
    """The final line (once): done, rate and total time."""
    if self.closed:
      return
    self.closed = True
    if self.enabled:
      self._report(self.clock(), final=True)

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(iterable, total: Optional[float] = None, desc: str = "", unit: str = "it", **kw):
  """Yields the items of `iterable`, counting one unit each (a Progress over a loop)."""
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  with Progress(total, desc, unit, **kw) as p:
    for item in iterable:
      yield item
      p.update(1)
