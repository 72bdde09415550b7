"""Process-level training checks through the real CLI in subprocesses: exact resume after kill -9 during an
async save, one trainer per workdir, SIGTERM through the CLI, and a preemption notice on one of two hosts
(then 2 processes x 2 devices == 1 process x 4 devices at every step)."""
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
def test_kill_during_an_async_save_then_resume_is_bitwise_and_logs_each_step_once(tokenizer_dir, digits_data_dir,
                                                                                   tmp_path):
  total = 24
  common = [f"--config.total_steps={total}", "--config.save_every=4", "--config.log_every=1",
            "--config.mesh.fsdp=2", "--config.async_checkpointing=true"]
  env = env_with_devices(2)
  straight = tmp_path / "straight"
  subprocess.run(cli_args(tokenizer_dir, digits_data_dir, straight, *common), env=env, check=True,
                 capture_output=True, timeout=600)
  # The same run, SIGKILLed as it logs step 12: the async save of step 12 is starting (and that of 8 may
  # still be in flight: a first save in a process takes a few steps' time).
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 12/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
  saved = committed(killed)
  assert max(saved, default=0) <= 12, saved
  out = subprocess.run(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env, check=True,
                       capture_output=True, text=True, timeout=600)
  assert (f"resumed from {killed}/checkpoints/{max(saved)}" if saved else "initialized from scratch") in out.stdout
  assert "taking over the stale lock" in out.stdout and f"pid {proc.pid} no longer runs" in out.stdout
  a, b = load_state(straight, total), load_state(killed, total)
  import jax
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  ca, cb = read_curve(straight), read_curve(killed)
  assert logged_steps(killed) == list(range(1, total + 1)), "each step once in metrics.jsonl"
  for s in range(1, total + 1):
    assert ca[s]["loss"] == cb[s]["loss"], s


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_sigterm_saves_through_the_cli(tokenizer_dir, digits_data_dir, tmp_path):
  env = env_with_devices(2)
  workdir = tmp_path / "run"
  args = cli_args(tokenizer_dir, digits_data_dir, workdir, "--config.total_steps=100000",
                  "--config.save_every=100000", "--config.log_every=1")
  first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in first.stdout:
    seen.append(line)
    if line.startswith("step 2/"):
      break
  second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 2, second.stderr
  assert f"another trainer holds this workdir (host {socket.gethostname()}, pid {first.pid}" in second.stderr
  assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
  first.send_signal(signal.SIGTERM)
  rest, _ = first.communicate(timeout=120)
  assert first.returncode == 0, "".join(seen) + rest
  last = [line for line in rest.splitlines() if line.startswith("SIGTERM")]
  assert last and last[0].startswith("SIGTERM: saved step "), rest
  step = int(last[0].split("saved step ")[1].split()[0])
  assert committed(workdir) == [step]
  assert logged_steps(workdir) == list(range(1, step + 1))
  assert not (workdir / "lock.json").exists()


def spawn_processes(n, args, devices_per_process=2):
  """n cooperating processes of one job (what launch/local_multihost.sh does), stdout piped."""
  import socket as socket_lib
  with socket_lib.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(n):
    env = env_with_devices(devices_per_process)
    env.update(LMFUSION_COORDINATOR=f"127.0.0.1:{port}", LMFUSION_NUM_PROCESSES=str(n), LMFUSION_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_the_same_saved_step(tokenizer_dir, digits_data_dir, tmp_path):
  """2 processes x 2 devices; the preemption notice reaches process 1 only. Both stop after the same step
  (JAX's preemption sync point), that step is committed, and the resumed run (through launch/local_multihost.sh)
  ends with the loss curve of one process x 8 devices at every step."""
  total = 30
  common = [f"--config.total_steps={total}", "--config.save_every=1000", "--config.log_every=1",
            "--config.data.process_sharding=rows", "--config.mesh.fsdp=-1"]
  # The reference: one process (this one, its 8 devices), the same config, never stopped.
  from lmfusion_jax.run_config import apply_overrides, load_config
  from lmfusion_jax.training.loop import train
  single = tmp_path / "single"
  train(apply_overrides(load_config(str(REPO / "configs/tiny.py")), cli_args(tokenizer_dir, digits_data_dir,
                                                                             single, *common)[6:]))
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
  assert 3 <= step < total and committed(multi) == [step]
  env = env_with_devices(2)
  env["DEVICES_PER_PROCESS"] = "2"
  env["LOG_DIR"] = str(tmp_path / "logs")
  r = subprocess.run(["bash", str(REPO / "launch/local_multihost.sh"), "2",
                      *cli_args(tokenizer_dir, digits_data_dir, multi, *common)],
                     env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr + (tmp_path / "logs" / "process_0.log").read_text()[-3000:]
  assert f"resumed from {multi}/checkpoints/{step}" in (tmp_path / "logs" / "process_0.log").read_text()
  c1, c2 = read_curve(single), read_curve(multi)
  assert logged_steps(multi) == list(range(1, total + 1))
  for s in c1:
    for k in ("loss", "text_loss", "image_loss"):
      assert abs(c1[s][k] - c2[s][k]) <= 1e-5, (s, k, c1[s][k], c2[s][k])
