"""What a training run owns in its workdir, besides the checkpoints: the lock, metrics.jsonl, the tokenizer.

  WORKDIR/lock.json        {"host", "pid", "started", "heartbeat"}: one trainer per workdir
  WORKDIR/metrics.jsonl    one JSON line per logged step; each step once, also across kill -9 and resume
  WORKDIR/tokenizer/       a copy of the run's tokenizer, so the workdir is a self-contained checkpoint

The lock. Process 0 of a run creates lock.json exclusively and deletes it on exit; it refreshes `heartbeat`
while training. A second trainer is refused with a message naming the holder. A lock left by a dead
process is taken over, with a warning:
  - on the same host: when the holder's pid no longer runs (checked with `kill(pid, 0)`);
  - from another host (shared storage such as gs://, where this host cannot see the holder's processes):
    when its heartbeat is older than `stale_after_s` (config `lock_stale_after_s`, default 10 min; a
    preempted pod's replacement VM resumes after that long at worst). On object stores there is no
    exclusive create, so two trainers started within the same second on different hosts can both pass;
    the read-back after writing narrows that window, it does not close it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from etils import epath

from lmfusion_jax.checkpoints.files import write_bytes, write_text
from lmfusion_jax.errors import UserError

LOCK_FILE = "lock.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"


class WorkdirLockedError(UserError):
  """Another trainer holds the workdir."""


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` (process 0 only). See the module docstring."""

  def __init__(self, workdir, stale_after_s: float = 600.0, warn=print):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.stale_after_s = float(stale_after_s)
    self.warn = warn
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self._held = False

  def _payload(self) -> bytes:
    return (json.dumps({**self.record, "heartbeat": time.time()}, sort_keys=True) + "\n").encode()

  def _holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      return {}   # a torn write: treated as a dead holder of unknown identity

  def _stale_reason(self, holder: dict) -> Optional[str]:
    if not holder:
      return "it is unreadable"
    if holder.get("host") == self.record["host"]:
      pid = int(holder.get("pid", -1))
      return None if pid > 0 and _pid_alive(pid) else f"pid {pid} no longer runs on this host"
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"its heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)" if age > self.stale_after_s else None

  def _create_exclusive(self) -> bool:
    if _is_local(self.path):
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:
        f.write(self._payload())
      return True
    if self.path.exists():
      return False
    write_bytes(self.path, self._payload())
    return True

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create_exclusive():
        break
      holder = self._holder()
      if holder is None:   # released between our two looks
        continue
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirLockedError(
            f"{self.path.parent}: another trainer holds this workdir (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, {self.path}); stop it first, or delete {self.path} if it is gone")
      self.warn(f"WARNING: taking over the stale lock {self.path} of host {holder.get('host')} pid "
                f"{holder.get('pid')}: {reason}")
      write_bytes(self.path, self._payload())
      break
    else:
      raise WorkdirLockedError(f"{self.path}: could not take the lock (it kept changing)")
    mine = self._holder() or {}
    if (mine.get("host"), mine.get("pid")) != (self.record["host"], self.record["pid"]):
      raise WorkdirLockedError(f"{self.path}: another trainer (host {mine.get('host')}, pid {mine.get('pid')}) "
                               f"took the lock at the same time")
    self._held = True

  def heartbeat(self) -> None:
    if self._held:
      write_bytes(self.path, self._payload())

  def release(self) -> None:
    if self._held:
      holder = self._holder() or {}
      if (holder.get("host"), holder.get("pid")) == (self.record["host"], self.record["pid"]):
        self.path.unlink()
      self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def check_writable(directory) -> None:
  """Writes and deletes a probe file in `directory` (created if missing) through epath, the way checkpoint
  saves write: a workdir that cannot take a save fails here, before any compute."""
  directory = epath.Path(directory)
  probe = directory / f".write-probe-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {directory}: not writable ({type(e).__name__}: {e}); no compute was spent") from e


def trim_metrics(workdir, last_step: int) -> int:
  """Drops metrics.jsonl lines of steps > `last_step` (steps a killed run logged but did not checkpoint; the
  resumed run logs them again) and torn lines; returns how many were dropped. Rewritten atomically."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      step = int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      dropped += 1
      continue
    if step <= last_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    write_text(path, "".join(line + "\n" for line in kept))
  return dropped


def copy_tokenizer(tokenizer_dir, workdir) -> epath.Path:
  """WORKDIR/tokenizer: the run's tokenizer files, copied once (what `sample`/`caption`/`eval` load)."""
  from lmfusion_jax.checkpoints.files import write_dir
  from lmfusion_jax.checkpoints.params import copy_tokenizer_files
  target = epath.Path(workdir) / TOKENIZER_DIR
  if target.exists():
    return target
  return write_dir(target, lambda tmp: copy_tokenizer_files(tokenizer_dir, tmp))
