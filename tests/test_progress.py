"""lmfusion_jax.progress.Progress: rate, ETA, TTY bar vs. plain lines, resume offset, postfix, process 0 only."""
import io

import pytest

from lmfusion_jax.progress import Progress, format_duration, track


class Clock:
  def __init__(self, t=100.0):
    self.t = t

  def __call__(self):
    return self.t


class FakeStream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self._tty = tty

  def isatty(self):
    return self._tty


def test_rate_and_eta_match_the_plain_formula():
  clock = Clock()
  p = Progress(50, "work", stream=FakeStream(False), clock=clock, enabled=True)
  for _ in range(12):
    clock.t += 0.3
    p.update(1)
  rate = 12 / (12 * 0.3)
  assert p.rate() == pytest.approx(rate)
  assert p.eta() == pytest.approx((50 - 12) / rate)


def test_non_tty_prints_a_line_at_most_every_interval_and_a_final_line():
  clock, out = Clock(), FakeStream(False)
  with Progress(100, "eval", unit="batch", stream=out, clock=clock, min_interval_s=10, enabled=True) as p:
    for _ in range(100):
      clock.t += 1.0          # 1 batch/s: a line every 10 batches
      p.update(1, loss=0.5)
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  assert len(lines) == 10 + 1
  assert lines[0] == "eval 10/100 batch 1.00 batch/s ETA 0:01:30 loss=0.5"
  assert lines[-1] == "eval 100/100 batch 1.00 batch/s in 0:01:40 loss=0.5"


def test_tty_redraws_one_line_as_a_bar():
  clock, out = Clock(), FakeStream(True)
  p = Progress(50, "sample", stream=out, clock=clock, enabled=True)
  assert p.tty and p.min_interval_s < 1
  for _ in range(12):
    clock.t += 1 / 3.4
    p.update()
  text = out.getvalue()
  assert text.startswith("\r") and "\n" not in text
  last = text.split("\r")[-1].rstrip()
  eta = format_duration(38 / 3.4)
  assert last == f"sample [######------------------] 12/50 3.40 it/s ETA {eta}"
  p.close()
  assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
  p.close()  # idempotent
  assert out.getvalue().count("\n") == 1


def test_tty_pads_a_shorter_redraw():
  clock, out = Clock(), FakeStream(True)
  p = Progress(None, "x", stream=out, clock=clock, enabled=True, min_interval_s=0)
  clock.t += 1
  p.update(1, note="a long postfix value")
  clock.t += 1
  p.set_postfix(note="b")
  p.update(1)
  first, second = out.getvalue().split("\r")[1:]
  assert len(second) == len(first) and second.rstrip().endswith("note=b")


def test_resume_offset_counts_only_this_runs_work():
  clock, out = Clock(), FakeStream(False)
  with Progress(1000, "train", unit="step", stream=out, clock=clock, initial=900, enabled=True) as p:
    for _ in range(50):
      clock.t += 0.5
      p.update(1, loss=1.23456)
    assert p.rate() == pytest.approx(2.0)
    assert p.eta() == pytest.approx(50 / 2.0)
  assert out.getvalue().splitlines()[-1] == "train 950/1000 step 2.00 step/s in 0:00:25 loss=1.235"


def test_unknown_total_and_float_units():
  clock, out = Clock(), FakeStream(False)
  with Progress(None, "write", unit="MiB", stream=out, clock=clock, enabled=True) as p:
    clock.t += 2
    p.update(3.5)
    assert p.eta() is None
  assert out.getvalue() == "write 3.5 MiB 1.75 MiB/s in 0:00:02\n"


def test_slow_rates_read_as_seconds_per_unit():
  clock, out = Clock(), FakeStream(False)
  with Progress(4, "caption", unit="batch", stream=out, clock=clock, enabled=True) as p:
    clock.t += 8
    p.update(2)
  assert out.getvalue() == "caption 2/4 batch 4.00 s/batch in 0:00:08\n"


def test_disabled_prints_nothing_but_still_counts():
  clock, out = Clock(), FakeStream(True)
  with Progress(3, "x", stream=out, clock=clock, enabled=False) as p:
    for _ in range(3):
      clock.t += 1
      p.update()
  assert out.getvalue() == "" and p.n == 3


def test_track_wraps_an_iterable():
  clock, out = Clock(), FakeStream(False)
  items = []
  for x in track([1, 2, 3], desc="items", stream=out, clock=clock, enabled=True):
    clock.t += 1
    items.append(x)
  assert items == [1, 2, 3]
  assert out.getvalue() == "items 3/3 1.00 it/s in 0:00:03\n"


def test_enabled_by_default_in_a_single_process():
  assert Progress(1, "x", stream=FakeStream(False)).enabled
