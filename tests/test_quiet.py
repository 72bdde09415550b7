"""Quiet by default: a real CLI command prints only its own lines (no libtpu / absl / orbax / TFDS chatter);
`--verbose` lets the libraries talk. And files the package writes respect the umask."""
import os
import subprocess
import sys

import pytest

from hf_models import make_hf_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ("absl", "libtpu", "InitGoogle", "E0000", "TPU_ACCELERATOR_TYPE", "ParamInfo", "ts_context",
         "read only", "Unknown size")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "llama"
  make_hf_llama(str(path))
  return str(path)


def convert(hf_dir, out, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("JAX_PLATFORMS", None)   # as a user runs it: JAX picks the platform (tries libtpu when installed)
  cmd = [sys.executable, "-m", "lmfusion_jax.cli", *flags, "convert-llama", "--hf-dir", hf_dir, "--out", out,
         "--boi-id", "3", "--eoi-id", "4", "--latent-size", "8", "--latent-channels", "1"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout, proc.stderr


def test_quiet_by_default_and_verbose_lets_libraries_talk(hf_dir, tmp_path):
  out, err = convert(hf_dir, str(tmp_path / "quiet"))
  assert out.startswith(f"wrote {tmp_path / 'quiet'}: text + image")
  lines = err.splitlines()
  assert [line for line in lines if any(n in line for n in NOISE)] == []
  # only our progress: the final `convert` line with the MiB written, rate and time
  assert lines and all(line.lstrip("\r").startswith("convert ") for line in lines), err
  assert "MiB/s" in lines[-1] and " in 0:" in lines[-1]

  _, loud = convert(hf_dir, str(tmp_path / "loud"), "--verbose")
  assert len(loud.splitlines()) > len(lines), loud   # orbax's absl warnings (and libtpu's, when installed)


def test_configure_verbose_changes_nothing():
  import logging
  from lmfusion_jax import logs
  before = dict(os.environ), logging.getLogger("absl").level
  logs.configure(True)
  assert (dict(os.environ), logging.getLogger("absl").level) == before
  assert logs.verbose()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_respect_the_umask(tmp_path, umask):
  from lmfusion_jax.checkpoints.files import write_dir, write_json

  def fill(tmp):
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.bin").write_bytes(b"x")
    write_json(tmp / "meta.json", {"a": 1})

  old = os.umask(umask)
  try:
    j = write_json(tmp_path / "new" / "a.json", {"a": 1})
    d = write_dir(tmp_path / "out", fill)
  finally:
    os.umask(old)
  mode = lambda p: os.stat(os.fspath(p)).st_mode & 0o777
  assert mode(j) == 0o666 & ~umask
  assert mode(tmp_path / "new") == 0o777 & ~umask
  assert mode(d) == 0o777 & ~umask
  assert mode(d / "sub") == 0o777 & ~umask
  assert mode(d / "meta.json") == mode(d / "sub" / "x.bin") == 0o666 & ~umask
