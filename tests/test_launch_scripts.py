"""launch/tpu_*.sh: syntax, usage text, required settings, and the exact gcloud commands --dry-run prints
(parsed back with shlex, compared with the documented `gcloud compute tpus tpu-vm` forms)."""
import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["tpu_create.sh", "tpu_setup.sh", "tpu_train.sh", "tpu_logs.sh", "tpu_stop.sh"]
TARGET = ["--tpu-name", "pod1", "--zone", "us-east5-a", "--project", "proj"]


def run(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items()
              if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "RUN")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env,
                        timeout=30)


def gcloud_lines(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


@pytest.mark.parametrize("script", SCRIPTS + ["tpu_common.sh"])
def test_syntax(script):
  assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_missing_settings(script):
  r = run(script, "--help")
  assert r.returncode == 0 and "--dry-run" in r.stdout and "TPU_NAME" in r.stdout
  assert "set -euo" not in r.stdout
  r = run(script, "--zone", "z", "--dry-run")
  assert r.returncode == 2 and "TPU_NAME is not set" in r.stderr
  r = run(script, "--tpu-name", "x", "--dry-run")
  assert r.returncode == 2 and "ZONE is not set" in r.stderr


def test_create_dry_run():
  r = run("tpu_create.sh", *TARGET, "--accelerator-type", "v5p-128", "--spot", "--dry-run")
  assert r.returncode == 0, r.stderr
  assert gcloud_lines(r.stdout) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-east5-a", "--project=proj",
      "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"]]
  # settings from the environment; runtime image per generation
  r = run("tpu_create.sh", "--dry-run", env={"TPU_NAME": "p2", "ZONE": "z", "ACCELERATOR_TYPE": "v5litepod-16"})
  assert gcloud_lines(r.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "create", "p2", "--zone=z",
                                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]
  r = run("tpu_create.sh", *TARGET, "--accelerator-type", "v9-8", "--dry-run")
  assert r.returncode == 2 and "RUNTIME_VERSION" in r.stderr


def test_setup_dry_run_copies_to_all_workers_and_installs_tpu_extra():
  r = run("tpu_setup.sh", *TARGET, "--dry-run")
  assert r.returncode == 0, r.stderr
  scp, ssh = gcloud_lines(r.stdout)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6] == "pod1:~/lmfusion-jax-src.tar.gz" and "--worker=all" in scp and "--zone=us-east5-a" in scp
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in ssh
  command = [a for a in ssh if a.startswith("--command=")][0]
  assert "pip install -q '.[tpu]'" in command and "tar -xzf ~/lmfusion-jax-src.tar.gz" in command


def test_train_dry_run_starts_the_command_on_all_workers():
  r = run("tpu_train.sh", *TARGET, "--run=exp1", "--dry-run", "--", "lmfusion-jax", "train", "--config",
          "configs/llama3_8b_lmfusion.py:v5p-128", "--config.workdir=gs://b/run one")
  assert r.returncode == 0, r.stderr
  (ssh,) = gcloud_lines(r.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
  assert "--worker=all" in ssh
  remote = [a for a in ssh if a.startswith("--command=")][0][len("--command="):]
  # the remote shell sees the user's command with its arguments intact (the space stays inside one word)
  job = remote.split("nohup ", 1)[1].split(" > ", 1)[0]
  assert shlex.split(job) == ["lmfusion-jax", "train", "--config", "configs/llama3_8b_lmfusion.py:v5p-128",
                              "--config.workdir=gs://b/run one"]
  assert "~/lmfusion-logs/exp1.log 2>&1 < /dev/null &" in remote and "~/lmfusion-logs/exp1.pid" in remote
  assert "export TPU_ACCELERATOR_TYPE=v5p-128" in remote
  r = run("tpu_train.sh", *TARGET, "--dry-run")
  assert r.returncode == 2 and "no command given" in r.stderr


def test_logs_and_stop_dry_run():
  r = run("tpu_logs.sh", *TARGET, "--worker=3", "--lines=20", "--follow", "--dry-run")
  (ssh,) = gcloud_lines(r.stdout)
  assert "--worker=3" in ssh and "--command=tail -n 20 -F ~/lmfusion-logs/train.log" in ssh
  r = run("tpu_logs.sh", *TARGET, "--worker=all", "--follow", "--dry-run")
  assert r.returncode == 2 and "--follow needs one worker" in r.stderr
  r = run("tpu_stop.sh", *TARGET, "--run=exp1", "--delete", "--dry-run")
  assert r.returncode == 0, r.stderr
  ssh, delete = gcloud_lines(r.stdout)
  assert "--worker=all" in ssh and "kill -TERM" in ssh[-1] and "~/lmfusion-logs/exp1.pid" in ssh[-1]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--zone=us-east5-a",
                    "--project=proj", "--quiet"]
