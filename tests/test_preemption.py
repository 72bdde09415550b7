"""Preemption-safe stops (issue 15): a SIGTERM (or one Ctrl-C) at any moment of a run ends it with a committed
checkpoint of the last completed step, awaited before the message says so, and resuming continues bitwise.

One workdir is stopped and resumed 10 times in a row, each time by a signal sent to this process from inside
the loop's own calls at a different moment (restore, compile, the first batch, a later batch, logging, writing
metrics.jsonl, starting an async save, an async save in flight, the last step's save, closing; one of them
a Ctrl-C), so each moment is hit every time. After every stop: the newest committed checkpoint is at least
the last step printed, and a "saved step N" claim was only made once N was committed. At the end the state
equals, bit for bit, that of the same run never stopped, and metrics.jsonl holds each step once."""
import json
import os
import signal
import types

import jax
import numpy as np
import pytest

from conftest import PREEMPT_TOTAL, saved_state, short_run_config
from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax.training import loop as loop_lib
from lmfusion_jax.training import step as ts

TOTAL = PREEMPT_TOTAL   # conftest's short run: 18 steps, the reference


def committed_steps(workdir) -> list:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA")))


def fire(sig):
  os.kill(os.getpid(), sig)


def install(monkeypatch, moment: str, sig, start: int):
  """Sends `sig` to this process once, at `moment` of a run resumed at step `start`."""
  fired = []

  def once():
    if not fired:
      fired.append(True)
      fire(sig)

  def wrap(owner, name, before=None, after=None):
    orig = getattr(owner, name)

    def wrapper(*a, **k):
      if after is None and (before is None or before(*a, **k)):
        once()
      out = orig(*a, **k)
      if after is not None and after(*a, **k):
        once()
      return out
    monkeypatch.setattr(owner, name, wrapper)

  calls = {"batch": 0}

  def nth_batch(n):
    def check(*a, **k):
      calls["batch"] += 1
      return calls["batch"] == n
    return check

  is_save = lambda self, step, *a, **k: step % 3 == 0 and step < TOTAL
  if moment == "restore":
    wrap(ckpt_lib.Checkpointer, "restore_latest")
  elif moment == "compile":
    wrap(ts, "jit_train_step")
  elif moment == "first batch":
    wrap(loop_lib, "global_batch", before=nth_batch(1))
  elif moment == "batch of the 3rd step":
    wrap(loop_lib, "global_batch", before=nth_batch(3))
  elif moment == "logging the 2nd step":
    wrap(loop_lib, "log", before=lambda msg: msg.startswith(f"step {start + 2}/"))
  elif moment == "writing metrics of the 1st step":
    real = json.dumps
    monkeypatch.setattr(loop_lib, "json", types.SimpleNamespace(
        dumps=lambda obj, *a, **k: (obj.get("step") == start + 1 and once(), real(obj, *a, **k))[1]))
  elif moment == "starting a periodic save":
    wrap(ckpt_lib.Checkpointer, "save", before=is_save)
  elif moment == "a periodic async save in flight":
    wrap(ckpt_lib.Checkpointer, "save", after=is_save)
  elif moment == "the last step's save":
    wrap(ckpt_lib.Checkpointer, "save", before=lambda self, step, *a, **k: step == TOTAL)
  elif moment == "closing":
    wrap(ckpt_lib.Checkpointer, "close")
  else:
    raise AssertionError(moment)
  return fired


# In the order they hit one workdir; the last two end the run (its last step saved, then closing).
STOPS = [("restore", signal.SIGTERM), ("compile", signal.SIGTERM), ("first batch", signal.SIGTERM),
         ("logging the 2nd step", signal.SIGINT), ("batch of the 3rd step", signal.SIGTERM),
         ("writing metrics of the 1st step", signal.SIGTERM), ("starting a periodic save", signal.SIGTERM),
         ("a periodic async save in flight", signal.SIGTERM), ("the last step's save", signal.SIGTERM),
         ("closing", signal.SIGTERM)]


@pytest.mark.slow
def test_ten_stops_at_different_moments_then_the_run_ends_bitwise_as_one_never_stopped(
    tokenizer_dir, digits_data_dir, short_run, tmp_path, monkeypatch):
  straight = short_run[0]   # the same run, never stopped
  workdir = str(tmp_path / "stopped")
  step, stopped_at = 0, []
  for moment, sig in STOPS:
    printed, committed_when_claimed = [], {}
    real_log = loop_lib.log

    def spy(msg):
      printed.append(msg)
      if "saved step" in msg:
        n = int(msg.split("saved step ")[1].split()[0])
        committed_when_claimed[n] = n in committed_steps(workdir)
      real_log(msg)
    with monkeypatch.context() as m:
      m.setattr(loop_lib, "log", spy)
      if moment == "writing metrics of the 1st step" and step >= TOTAL - 1:
        raise AssertionError("the chain ran out of steps")
      fired = install(m, moment, sig, step)
      metrics = loop_lib.train(short_run_config(tokenizer_dir, digits_data_dir, workdir))
    where = f"{signal.Signals(sig).name} at {moment!r} (resumed at {step})"
    assert fired, f"{where}: the signal was never sent"
    logged = [int(p.split()[1].split("/")[0]) for p in printed if p.startswith("step ")]
    saved = committed_steps(workdir)
    if logged:
      assert saved and saved[-1] >= logged[-1], (where, logged, saved)
    assert all(committed_when_claimed.values()), (where, committed_when_claimed)
    if metrics["step"] < TOTAL:
      assert any(p.startswith(signal.Signals(sig).name) for p in printed), (where, printed)
      if metrics["step"] > step:
        assert saved[-1] == metrics["step"], where
    step = max(step, metrics["step"])
    stopped_at.append(metrics["step"])
  assert step == TOTAL, stopped_at
  print("stopped at steps", stopped_at)
  assert len(set(stopped_at)) >= 6, f"the stops should spread over the run: {stopped_at}"
  want, got = saved_state(straight, TOTAL), saved_state(workdir, TOTAL)
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                               jax.tree_util.tree_flatten_with_path(got)[0], strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in lines] == list(range(1, TOTAL + 1)), "each step once in metrics.jsonl"
  straight_lines = [json.loads(x) for x in open(os.path.join(straight, "metrics.jsonl"))]
  assert [r["loss"] for r in lines] == [r["loss"] for r in straight_lines]
  assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_a_second_ctrl_c_aborts_without_saving(tokenizer_dir, digits_data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  cfg = short_run_config(tokenizer_dir, digits_data_dir, workdir)
  real_log = loop_lib.log

  def spy(msg):
    real_log(msg)
    if msg.startswith("step 1/"):
      fire(signal.SIGINT)
      fire(signal.SIGINT)
  monkeypatch.setattr(loop_lib, "log", spy)
  with pytest.raises(KeyboardInterrupt):
    loop_lib.train(cfg)
  assert committed_steps(workdir) == []
  assert not os.path.exists(os.path.join(workdir, "lock.json")), "the lock is released on abort too"
