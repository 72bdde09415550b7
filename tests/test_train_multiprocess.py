"""Process-level training checks: exact resume after the process is killed, and multi-host equivalence
(2 processes x 2 devices == 1 process x 4 devices). Each runs the real CLI in subprocesses."""
import json
import os
import pathlib
import signal
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


@pytest.mark.slow
def test_resume_after_kill_is_bitwise_exact(tokenizer_dir, digits_data_dir, tmp_path):
  total = 24
  common = [f"--config.total_steps={total}", "--config.save_every=4", "--config.log_every=1",
            "--config.mesh.fsdp=2", "--config.async_checkpointing=true"]
  env = env_with_devices(2)
  straight = tmp_path / "straight"
  subprocess.run(cli_args(tokenizer_dir, digits_data_dir, straight, *common), env=env, check=True,
                 capture_output=True, timeout=600)
  # The same run, SIGKILLed once it has logged step 9 (checkpoints exist at 4 and 8), then resumed.
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 9/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < total, saved
  out = subprocess.run(cli_args(tokenizer_dir, digits_data_dir, killed, *common), env=env, check=True,
                       capture_output=True, text=True, timeout=600)
  assert "resumed from" in out.stdout, out.stdout
  a, b = load_state(straight, total), load_state(killed, total)
  import jax
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  ca, cb = read_curve(straight), read_curve(killed)
  for s in range(max(saved) + 1, total + 1):
    assert ca[s]["loss"] == cb[s]["loss"], s


@pytest.mark.slow
def test_two_processes_match_one_process(tokenizer_dir, digits_data_dir, tmp_path):
  common = ["--config.total_steps=5", "--config.save_every=100", "--config.log_every=1",
            "--config.data.process_sharding=rows", "--config.mesh.fsdp=-1"]
  single = tmp_path / "single"
  subprocess.run(cli_args(tokenizer_dir, digits_data_dir, single, *common), env=env_with_devices(4),
                 check=True, capture_output=True, timeout=600)
  multi = tmp_path / "multi"
  env = env_with_devices(2)
  env["DEVICES_PER_PROCESS"] = "2"
  env["LOG_DIR"] = str(tmp_path / "logs")
  r = subprocess.run(["bash", str(REPO / "launch/local_multihost.sh"), "2",
                      *cli_args(tokenizer_dir, digits_data_dir, multi, *common)],
                     env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr + (tmp_path / "logs" / "process_0.log").read_text()[-3000:]
  log0 = (tmp_path / "logs" / "process_0.log").read_text()
  assert "step 5/5" in log0
  c1, c2 = read_curve(single), read_curve(multi)
  assert sorted(c1) == sorted(c2) == [1, 2, 3, 4, 5]
  for s in c1:
    for k in ("loss", "text_loss", "image_loss"):
      assert abs(c1[s][k] - c2[s][k]) <= 1e-5, (s, k, c1[s][k], c2[s][k])
