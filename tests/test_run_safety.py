"""What a run refuses or repairs before it spends compute (issue 15): a refused resume or init writes nothing,
a damaged newest checkpoint falls back to the previous good one, one trainer per workdir (with stale locks
taken over), an unwritable workdir fails first, and `model.preset="init"` takes the model from init_from."""
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import PREEMPT_TOTAL, saved_state, short_run_config
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.errors import UserError
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.training import loop as loop_lib
from lmfusion_jax.training.workdir import LOCK_FILE, WorkdirLock, WorkdirLockedError


def snapshot(folder) -> dict:
  """{relative path: sha256} of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def assert_states_equal(a, b):
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                               jax.tree_util.tree_flatten_with_path(b)[0], strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def copied_run(short_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(short_run[0], workdir)
  return workdir


def test_a_refused_resume_writes_nothing(copied_run, tokenizer_dir, digits_data_dir):
  before = snapshot(copied_run)
  cfg = short_run_config(tokenizer_dir, digits_data_dir, copied_run)
  cfg.model.ffn_dim = 256
  cfg.total_steps = PREEMPT_TOTAL + 2
  with pytest.raises(ConfigError) as e:
    loop_lib.train(cfg)
  assert "model.ffn_dim: 128 in the checkpoint vs 256 in this config" in str(e.value)
  assert "run_config.json" in str(e.value) and "nothing was written" in str(e.value)
  assert snapshot(copied_run) == before


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(copied_run, short_run, tokenizer_dir,
                                                                    digits_data_dir, capsys):
  os.remove(os.path.join(copied_run, "checkpoints", str(PREEMPT_TOTAL), "state", "_METADATA"))
  loop_lib.train(short_run_config(tokenizer_dir, digits_data_dir, copied_run))
  out = capsys.readouterr().out
  damaged = os.path.join(copied_run, "checkpoints", str(PREEMPT_TOTAL))
  assert f"WARNING: checkpoint {damaged} is damaged or unreadable (missing or empty: state/_METADATA)" in out
  assert f"resumed from {os.path.join(copied_run, 'checkpoints')}/{PREEMPT_TOTAL - 3}" in out
  assert os.path.isdir(damaged + ".damaged"), "the damaged step is kept aside for inspection"
  assert_states_equal(saved_state(copied_run), short_run[1])   # steps 4..6 re-run exactly
  steps = [json.loads(x)["step"] for x in open(os.path.join(copied_run, "metrics.jsonl"))]
  assert steps == list(range(1, PREEMPT_TOTAL + 1))


def test_no_good_checkpoint_names_the_damaged_file_and_writes_nothing(copied_run, tokenizer_dir, digits_data_dir):
  for step in (PREEMPT_TOTAL - 3, PREEMPT_TOTAL):   # the two kept
    os.remove(os.path.join(copied_run, "checkpoints", str(step), "state", "_METADATA"))
  before = snapshot(copied_run)
  with pytest.raises(CheckpointError) as e:
    loop_lib.train(short_run_config(tokenizer_dir, digits_data_dir, copied_run))
  msg = str(e.value)
  assert f"checkpoints/{PREEMPT_TOTAL} is damaged" in msg and "state/_METADATA" in msg
  assert "config" not in msg.split("newest:")[1], "the checkpoint is blamed, not the config"
  assert snapshot(copied_run) == before


# --- the workdir lock ------------------------------------------------------------------------------------
def dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), "w") as f:
    json.dump(record, f)


def test_a_live_holder_on_this_host_is_refused_by_name(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lock(tmp_path, host=socket.gethostname(), pid=holder.pid, heartbeat=time.time())
    with pytest.raises(WorkdirLockedError) as e:
      WorkdirLock(tmp_path).acquire()
    assert f"pid {holder.pid}" in str(e.value) and socket.gethostname() in str(e.value)
  finally:
    holder.kill()


def test_stale_locks_are_taken_over_with_a_warning(tmp_path):
  warnings = []
  pid = dead_pid()
  write_lock(tmp_path, host=socket.gethostname(), pid=pid, heartbeat=time.time())
  with WorkdirLock(tmp_path, warn=warnings.append):
    held = json.load(open(tmp_path / LOCK_FILE))
    assert held["pid"] == os.getpid()
  assert f"pid {pid} no longer runs on this host" in warnings[0]
  assert not (tmp_path / LOCK_FILE).exists(), "released on exit"
  # Another host (shared storage): stale only once its heartbeat is older than stale_after_s.
  write_lock(tmp_path, host="other-host", pid=1, heartbeat=time.time())
  with pytest.raises(WorkdirLockedError, match="host other-host, pid 1"):
    WorkdirLock(tmp_path, stale_after_s=600).acquire()
  write_lock(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 700)
  with WorkdirLock(tmp_path, stale_after_s=600, warn=warnings.append):
    pass
  assert "heartbeat is 700 s old" in warnings[-1]


def test_a_second_trainer_is_refused_before_it_writes(copied_run, tokenizer_dir, digits_data_dir):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lock(copied_run, host=socket.gethostname(), pid=holder.pid, heartbeat=time.time())
    before = snapshot(copied_run)
    cfg = short_run_config(tokenizer_dir, digits_data_dir, copied_run)
    cfg.total_steps = PREEMPT_TOTAL + 2
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
      loop_lib.train(cfg)
    assert snapshot(copied_run) == before
  finally:
    holder.kill()


def test_an_unwritable_workdir_fails_before_any_compute(tmp_path, tokenizer_dir, digits_data_dir):
  (tmp_path / "a_file").write_text("x")
  cfg = short_run_config(tokenizer_dir, digits_data_dir, str(tmp_path / "a_file" / "run"))
  with pytest.raises(UserError, match="not writable"):
    loop_lib.train(cfg)


# --- init_from -------------------------------------------------------------------------------------------
def init_checkpoint(tmp_path, cfg, **fusion_changes):
  """A params checkpoint of the run's model (fusion fields changed as given), written by save_params."""
  from lmfusion_jax import sharding
  from lmfusion_jax.checkpoints.params import save_params
  from lmfusion_jax.models import sharded
  from lmfusion_jax.run_config import model_configs
  lcfg, fcfg, _ = model_configs(cfg)
  fcfg = dataclasses.replace(fcfg, boi_id=5, eoi_id=6, **fusion_changes)
  _, params = sharded.init_sharded(lcfg, fcfg, sharding.mesh_from_config(cfg.mesh), seed=3)
  path = str(tmp_path / "init")
  save_params(path, jax.tree.map(np.asarray, params), lcfg, fcfg)
  return path


def test_init_from_with_another_unet_is_refused_unless_reinit_is_asked(tmp_path, tokenizer_dir, digits_data_dir):
  cfg = short_run_config(tokenizer_dir, digits_data_dir, str(tmp_path / "run"))
  cfg.init_from = init_checkpoint(tmp_path, cfg, unet_channels=(16, 32), unet_groups=4)
  with pytest.raises(ConfigError) as e:
    loop_lib.train(cfg)
  msg = str(e.value)
  assert "fusion.unet_channels: (16, 32) in the checkpoint vs (32, 64) in this config" in msg
  assert "differing leaves: image[" in msg and "reinit_image=true" in msg
  assert not (tmp_path / "run").exists(), "refused before anything was written"
  cfg.reinit_image, cfg.total_steps, cfg.save_every = True, 1, 1
  assert loop_lib.train(cfg)["step"] == 1


def test_model_preset_init_takes_the_architecture_from_init_from(tmp_path, tokenizer_dir, digits_data_dir):
  cfg = short_run_config(tokenizer_dir, digits_data_dir, str(tmp_path / "run"))
  cfg.init_from = init_checkpoint(tmp_path, cfg)
  with cfg.ignore_type():
    cfg.model = {"preset": "init", "param_dtype": "float32", "dtype": "float32", "attention_impl": "xla"}
  cfg.total_steps, cfg.save_every = 1, 1
  loop_lib.train(cfg)
  record = json.load(open(tmp_path / "run" / "run_config.json"))
  stored = json.load(open(os.path.join(cfg.init_from, "lmfusion.json")))
  for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
    assert record["llama"][k] == stored["llama"][k], k
  assert record["config"]["init_from"] == os.path.abspath(cfg.init_from)


@pytest.mark.parametrize("missing", ["params/state/_METADATA", "params/state/manifest.ocdbt",
                                     "params/_CHECKPOINT_METADATA"])
def test_a_damaged_params_checkpoint_is_named_with_its_file(tmp_path, tokenizer_dir, digits_data_dir, capsys,
                                                             missing):
  from lmfusion_jax import cli
  cfg = short_run_config(tokenizer_dir, digits_data_dir, str(tmp_path / "run"))
  path = init_checkpoint(tmp_path, cfg)
  os.remove(os.path.join(path, missing))
  for argv in (["export-llama", "--checkpoint", path, "--out", str(tmp_path / "hf")],
               ["generate", "--checkpoint", path, "--tokenizer", tokenizer_dir, "--prompt", "one"]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"lmfusion-jax {argv[0]}: error: params checkpoint {path} is damaged or unreadable " \
                  f"(missing or empty: {missing})\n"
  assert not (tmp_path / "hf").exists()
