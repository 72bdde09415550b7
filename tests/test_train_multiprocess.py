"""Process-level training checks through the real CLI in subprocesses: one trainer per workdir, exact resume
after kill -9 during an async save, a preemption notice on one of two hosts
(2 processes x 2 devices stop at the same step, with the curve of 1 process x 8 devices)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def cli_args(tokenizer_dir, data_dir, workdir, *extra):
  return [sys.executable, "-m", "lmfusion_jax.cli", "train", "--config", str(REPO / "configs/tiny.py"),
          f"--config.workdir={workdir}", f"--config.data.tokenizer_dir={tokenizer_dir}",
          f"--config.data.data_dir={data_dir}", "--config.tensorboard=false", *extra]


def env_with_devices(n):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def read_curve(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {int(r["step"]): r for r in map(json.loads, lines)}


def load_state(workdir, step):
  """The saved train state of `step` as numpy leaves (restored with orbax on one device)."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
  import jax
  return jax.tree.map(np.asarray, tree)


def committed(workdir) -> list:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def logged_steps(workdir) -> list:
  return [int(json.loads(x)["step"]) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_trainer_is_refused_then_kill_during_an_async_save_and_resume_bitwise(tokenizer_dir, digits_data_dir,
                                                                                   short_run, tmp_path):
  """conftest's short run (18 steps, an async save every 3) through the CLI on the same 8 devices. A second
  trainer on its workdir is refused, naming the first. SIGKILLed as it logs step 12 (the async save of step
  12 is starting, an earlier one may still be in flight), then resumed (taking over the dead trainer's lock): it ends bitwise where the short run (never
  killed) ends, and metrics.jsonl has each step once."""
  from conftest import PREEMPT_TOTAL as total
  common = [f"--config.total_steps={total}", "--config.save_every=3", "--config.log_every=1",
            "--config.async_checkpointing=true"]
  env = env_with_devices(8)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 1/"):
      # A second trainer on the same workdir (the first one paused, so it surely still holds the lock).
      proc.send_signal(signal.SIGSTOP)
      second = subprocess.run(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env,
                              capture_output=True, text=True, timeout=300)
      proc.send_signal(signal.SIGCONT)
      assert second.returncode == 2, second.stderr
      assert f"another trainer holds this workdir (host {socket.gethostname()}, pid {proc.pid}" in second.stderr
      assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
    if line.startswith("step 12/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
  saved = committed(killed)
  print(f"kill -9 at the log of step 12: committed steps {saved}; second trainer: {second.stderr.strip()}")
  assert max(saved, default=0) <= 12, saved
  out = subprocess.run(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env, check=True,
                       capture_output=True, text=True, timeout=600)
  assert (f"resumed from {killed}/checkpoints/{max(saved)}" if saved else "initialized from scratch") in out.stdout
  assert "taking over the stale lock" in out.stdout and f"pid {proc.pid} no longer runs" in out.stdout
  a, b = short_run[1], load_state(killed, total)
  import jax
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  ca, cb = read_curve(short_run[0]), read_curve(killed)
  assert logged_steps(killed) == list(range(1, total + 1)), "each step once in metrics.jsonl"
  for s in range(1, total + 1):
    assert ca[s]["loss"] == cb[s]["loss"], s


def spawn_processes(n, args, devices_per_process=2, cwd=None):
  """n cooperating processes of one job (what launch/local_multihost.sh does), stdout piped."""
  import socket as socket_lib
  with socket_lib.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(n):
    env = env_with_devices(devices_per_process)
    env.update(LMFUSION_COORDINATOR=f"127.0.0.1:{port}", LMFUSION_NUM_PROCESSES=str(n), LMFUSION_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=cwd))
  return procs


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_the_same_saved_step(tokenizer_dir, digits_data_dir, tmp_path):
  """2 processes x 2 devices; the preemption notice reaches process 1 only. Both stop after the same step
  (JAX's preemption sync point): both wrote their part of that step's checkpoint, it is committed, and the
  loss curve up to it equals that of one process x 8 devices (the same batches: process_sharding=rows)."""
  total = 30
  common = [f"--config.total_steps={total}", "--config.save_every=1000", "--config.log_every=1",
            "--config.data.process_sharding=rows", "--config.mesh.fsdp=-1"]
  multi = tmp_path / "multi"
  procs = spawn_processes(2, cli_args(tokenizer_dir, digits_data_dir, multi, *common))
  seen = []
  for line in procs[0].stdout:
    seen.append(line)
    if line.startswith("step 3/"):
      procs[1].send_signal(signal.SIGTERM)
      break
  outs = [p.communicate(timeout=300)[0] for p in procs]
  outs[0] = "".join(seen) + outs[0]
  assert [p.returncode for p in procs] == [0, 0], outs
  claim = [line for line in outs[0].splitlines() if line.startswith("SIGTERM: saved step")]
  assert claim, outs[0]
  step = int(claim[0].split("saved step ")[1].split()[0])
  print(f"SIGTERM to process 1 after process 0 logged step 3; both stopped and saved at step {step}")
  assert 3 <= step < total and committed(multi) == [step]
  data = multi / "checkpoints" / str(step) / "data"
  assert sorted(f.name for f in data.iterdir() if f.name.startswith("process_")) == \
      ["process_0-of-2.json", "process_1-of-2.json"], "each process saved its data state at that step"
  # The reference: one process (this one, its 8 devices), the same config, never stopped.
  from lmfusion_jax.run_config import apply_overrides, load_config
  from lmfusion_jax.training.loop import train
  single = tmp_path / "single"
  train(apply_overrides(load_config(str(REPO / "configs/tiny.py")), cli_args(tokenizer_dir, digits_data_dir,
                                                                             single, *common)[6:]))
  c1, c2 = read_curve(single), read_curve(multi)
  assert logged_steps(multi) == list(range(1, step + 1))
  for s in range(1, step + 1):
    for k in ("loss", "text_loss", "image_loss"):
      assert abs(c1[s][k] - c2[s][k]) <= 1e-5, (s, k, c1[s][k], c2[s][k])


def test_the_local_launcher_forwards_sigterm_and_waits_for_the_processes(tmp_path):
  """launch/local_multihost.sh: a SIGTERM to the launcher reaches every process, which may take their time
  to save; the launcher waits for them and exits 0 when they all do."""
  child = ("import os, signal, sys, time\n"
           "def stop(*_):\n"
           "  time.sleep(1.0); open(os.environ['LMFUSION_PROCESS_ID'] + '.stopped', 'w').close(); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop)\n"
           "open(os.environ['LMFUSION_PROCESS_ID'] + '.ready', 'w').close()\n"
           "time.sleep(60)\n")
  env = dict(os.environ, LOG_DIR=str(tmp_path / "logs"))
  launcher = subprocess.Popen(["bash", str(REPO / "launch/local_multihost.sh"), "2", sys.executable, "-c", child],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  import time
  deadline = time.time() + 60
  while not all((tmp_path / f"{i}.ready").exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.1)
  launcher.send_signal(signal.SIGTERM)
  out, _ = launcher.communicate(timeout=60)
  assert launcher.returncode == 0, out
  assert all((tmp_path / f"{i}.stopped").exists() for i in range(2)), out
