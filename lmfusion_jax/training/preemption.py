"""Stopping a run on SIGTERM (how preemption arrives on TPU pods) or Ctrl-C, at a step all processes agree on.

`StopRequest` is used around the training loop:

  with StopRequest() as stop:
    while ...:
      state = step(state)
      if stop.now(step):      # True at the same step on every process
        save, wait for the commit, then exit 0

One process: Python handlers for SIGTERM and SIGINT set a flag; `now(step)` returns it.

Several processes (jax.distributed initialized): JAX's preemption sync manager owns SIGTERM (its C++
notifier catches the signal on any host and the coordination service propagates it); `now(step)` is
`multihost_utils.reached_preemption_sync_point(step)`, which becomes True on every host at the same step
(the largest step any host had reached, plus one), as MaxText and orbax use it. A Python SIGTERM handler
would displace that notifier, so none is installed; SIGINT is turned into a SIGTERM to this process so it
takes the same agreed path.

A second SIGINT aborts at once (KeyboardInterrupt): no save.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional


def _multi_process() -> bool:
  from jax._src import distributed  # the preemption sync manager lives on the global distributed state
  return distributed.global_state.client is not None and \
      distributed.global_state.preemption_sync_manager is not None


class StopRequest:
  """Signal handlers for the duration of a `with` block (main thread only; elsewhere they are not set)."""

  def __init__(self):
    self.signal_name: Optional[str] = None   # the first signal received, for the exit message
    self._old = {}
    self._multi = False
    self._sigints = 0

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    self._multi = _multi_process()
    wanted = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for sig in wanted:
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      self._sigints += 1
      if self._sigints > 1:
        raise KeyboardInterrupt("second Ctrl-C: aborting without a save")
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
    if self._multi and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)   # through JAX's preemption notifier, so all hosts agree

  @property
  def requested(self) -> bool:
    """A signal reached this process (the agreed stop step may still be ahead)."""
    return self.signal_name is not None

  def now(self, step: int) -> bool:
    """Stop after `step`? Call once per completed step, on every process, with the same step numbers."""
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.requested
