"""Preemption-safe stops (issue 15): a SIGTERM (or one Ctrl-C) at any moment of a run ends it with a committed
checkpoint of the last completed step, awaited before the message says so, and the resumed run ends bitwise
where a run never stopped ends. The signal is sent to this process from inside the loop's own calls, at 10
different moments (restore, compile, fetching a batch, logging, writing metrics.jsonl, starting an async save,
while an async save is in flight, the last step's save, closing), so each moment is hit every time."""
import json
import os
import signal
import types

import jax
import numpy as np
import pytest

from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax.training import loop as loop_lib
from lmfusion_jax.training import step as ts
from conftest import PREEMPT_TOTAL as TOTAL, saved_state, short_run_config


def committed_steps(workdir) -> list:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA")))


def fire(sig):
  os.kill(os.getpid(), sig)


def install(monkeypatch, moment: str, sig):
  """Sends `sig` to this process once, at `moment`."""
  fired = []

  def once():
    if not fired:
      fired.append(True)
      fire(sig)

  def wrap(owner, name, before=None, after=None):
    orig = getattr(owner, name)

    def wrapper(*a, **k):
      if before is None or before(*a, **k):
        once() if after is None else None
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

  if moment == "restore":
    wrap(ckpt_lib.Checkpointer, "restore_latest")
  elif moment == "compile":
    wrap(ts, "jit_train_step")
  elif moment == "first batch":
    wrap(loop_lib, "global_batch", before=nth_batch(1))
  elif moment == "batch of step 5":
    wrap(loop_lib, "global_batch", before=nth_batch(5))
  elif moment == "logging step 2":
    wrap(loop_lib, "log", before=lambda msg: msg.startswith("step 2/"))
  elif moment == "writing metrics of step 4":
    real = json.dumps
    monkeypatch.setattr(loop_lib, "json", types.SimpleNamespace(
        dumps=lambda obj, *a, **k: (obj.get("step") == 4 and once(), real(obj, *a, **k))[1]))
  elif moment == "starting the save of step 3":
    wrap(ckpt_lib.Checkpointer, "save", before=lambda self, step, *a, **k: step == 3)
  elif moment == "async save of step 3 in flight":
    wrap(ckpt_lib.Checkpointer, "save", after=lambda self, step, *a, **k: step == 3)
  elif moment == "the last step's save":
    wrap(ckpt_lib.Checkpointer, "save", before=lambda self, step, *a, **k: step == TOTAL)
  elif moment == "closing":
    wrap(ckpt_lib.Checkpointer, "close")
  else:
    raise AssertionError(moment)
  return fired


MOMENTS = ["restore", "compile", "first batch", "batch of step 5", "logging step 2",
           "writing metrics of step 4", "starting the save of step 3", "async save of step 3 in flight",
           "the last step's save", "closing"]


# SIGINT (once) takes the SIGTERM path; two of the moments check it.
CASES = [(m, signal.SIGTERM) for m in MOMENTS] + [(m, signal.SIGINT) for m in
                                                  ("logging step 2", "async save of step 3 in flight")]


@pytest.mark.slow
@pytest.mark.parametrize("moment,sig", CASES, ids=[f"{signal.Signals(s).name}-{m}" for m, s in CASES])
def test_a_signal_at_any_moment_saves_the_last_step_then_resume_is_bitwise(
    tokenizer_dir, digits_data_dir, tmp_path, monkeypatch, short_run, moment, sig):
  workdir = str(tmp_path / "run")
  cfg = short_run_config(tokenizer_dir, digits_data_dir, workdir)
  printed, committed_when_claimed = [], {}
  real_log = loop_lib.log

  def spy(msg):
    printed.append(msg)
    if "saved step" in msg:
      step = int(msg.split("saved step ")[1].split()[0])
      committed_when_claimed[step] = step in committed_steps(workdir)
    real_log(msg)
  monkeypatch.setattr(loop_lib, "log", spy)
  fired = install(monkeypatch, moment, sig)
  metrics = loop_lib.train(cfg)
  monkeypatch.undo()
  assert fired, f"the signal was never sent at {moment!r}"
  logged = [int(m.split()[1].split("/")[0]) for m in printed if m.startswith("step ")]
  saved = committed_steps(workdir)
  # The newest committed checkpoint is at least the last step the run printed.
  if logged:
    assert saved and saved[-1] >= logged[-1], (moment, logged, saved)
  # A claim of a save is only ever made after the save committed.
  assert all(committed_when_claimed.values()), committed_when_claimed
  signame = signal.Signals(sig).name
  stopped_early = metrics["step"] < TOTAL
  if stopped_early:
    assert any(m.startswith(signame) for m in printed), printed
    if metrics["step"] > 0:
      assert saved[-1] == metrics["step"]
  # Resuming (no signal) finishes the run exactly as the run that was never stopped.
  loop_lib.train(short_run_config(tokenizer_dir, digits_data_dir, workdir))
  got = saved_state(workdir)
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(short_run[1])[0],
                               jax.tree_util.tree_flatten_with_path(got)[0], strict=True):
    np.testing.assert_array_equal(a, b, err_msg=f"{moment}: {jax.tree_util.keystr(path)}")
  lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in lines] == list(range(1, TOTAL + 1)), "each step once in metrics.jsonl"
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
