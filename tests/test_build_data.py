"""`lmfusion-jax build-data` and the digits cache (data.cache.ensure_digits_assets)."""
import os

import pytest

from lmfusion_jax import cli
from lmfusion_jax.data import cache
from lmfusion_jax.data.tfds_digits import digits_builder
from lmfusion_jax.data.tokenizer import load_tokenizer, special_ids


def test_build_data_digits_from_another_cwd(tmp_path, monkeypatch, capsys):
  """Relative paths are resolved against the cwd of the call and printed absolute."""
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.chdir(work)
  rc = cli.main(["build-data", "digits", "--data-dir", "rel/tfds", "--image-size", "8",
                 "--tokenizer-out", "tok", "--vocab-size", "300"])
  assert rc == 0
  out = capsys.readouterr().out
  data_dir, tok_dir = str(work / "rel" / "tfds"), str(work / "tok")
  assert f"--config.data.data_dir={data_dir}" in out and f"--config.data.tokenizer_dir={tok_dir}" in out
  monkeypatch.chdir(tmp_path)                                    # read from elsewhere
  builder = digits_builder(data_dir, 8)
  assert builder.is_prepared()
  assert len(builder.as_data_source("train")) == 1497 and len(builder.as_data_source("test")) == 300
  assert builder.as_data_source("train")[0]["latent"].shape == (8, 8, 1)
  sp = special_ids(load_tokenizer(tok_dir))
  assert len({sp["boi"], sp["eoi"], sp["bos"], sp["eos"]}) == 4
  # an existing tokenizer folder is not replaced silently: one-line error, exit 2
  monkeypatch.chdir(work)
  assert cli.main(["build-data", "digits", "--data-dir", "rel/tfds", "--tokenizer-out", "tok"]) == 2
  assert "already exists" in capsys.readouterr().err


def test_build_data_bad_input_exits_2(tmp_path, capsys):
  assert cli.main(["build-data", "digits", "--data-dir", str(tmp_path), "--image-size", "12"]) == 2
  assert capsys.readouterr().err.strip() == "lmfusion-jax build-data: error: digits: image_size=12 not in (8, 16, 32)"
  assert cli.main(["build-data", "image-captions", "--source", str(tmp_path / "none"), "--vae", str(tmp_path),
                   "--data-dir", str(tmp_path / "tfds"), "--image-size", "8"]) == 2
  assert "no captions.jsonl or captions.csv" in capsys.readouterr().err


def _snapshot(root) -> dict:
  """{relative path: mtime_ns} of every file and folder under `root`."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(d, name)
      out[os.path.relpath(p, root)] = os.stat(p).st_mtime_ns
  return out


def test_digits_cache_is_built_once(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  data_dir, tok_dir = cache.ensure_digits_assets(8, 300, cache_dir=str(root))
  assert os.path.isabs(data_dir) and os.path.isabs(tok_dir)
  assert digits_builder(data_dir, 8).is_prepared()
  sp = special_ids(load_tokenizer(tok_dir))
  assert {"boi", "eoi"} <= set(sp) and sp["boi"] != sp["eoi"]
  before = _snapshot(root)
  assert os.listdir(root) == ["digits-s8-v300"]                 # no temporary left behind

  def no_work(*a, **k):
    raise AssertionError("the second call rebuilt the cache")
  monkeypatch.setattr(cache, "_fill", no_work)
  monkeypatch.setenv(cache.CACHE_ENV, str(root))                # and found through the env var
  assert cache.ensure_digits_assets(8, 300) == (data_dir, tok_dir)
  assert _snapshot(root) == before


def test_digits_cache_race_loser_uses_the_winner(tmp_path, monkeypatch):
  """A process that built its own copy while another renamed first keeps the winner's entry, drops its own."""
  root = str(tmp_path / "cache")
  winner = cache.ensure_digits_assets(8, 300, cache_dir=root)
  before = _snapshot(root)
  real_complete, calls = cache._complete, []

  def late_complete(entry):                                     # the loser's first look: not there yet
    calls.append(entry)
    return False if len(calls) == 1 else real_complete(entry)
  monkeypatch.setattr(cache, "_complete", late_complete)
  assert cache.ensure_digits_assets(8, 300, cache_dir=root) == winner
  assert len(calls) == 2                                        # it built, lost the rename, looked again
  assert _snapshot(root) == before


def test_cache_root_order(tmp_path, monkeypatch):
  monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
  assert cache.cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
  assert cache.cache_root() == str(tmp_path / "env")
  monkeypatch.delenv(cache.CACHE_ENV)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache.cache_root() == str(tmp_path / "home" / ".cache" / "lmfusion_jax")


def test_incomplete_cache_entry_is_reported(tmp_path):
  (tmp_path / "digits-s8-v300").mkdir()
  with pytest.raises(cache.UserError, match="digits-s8-v300 exists but has no assets.json"):
    cache.ensure_digits_assets(8, 300, cache_dir=str(tmp_path))
