"""`prepare-data` (lmfusion_jax.data.prepare): webdataset / parquet / folder sources with bad records -> the
image_captions TFDS dataset; exact skip counts per reason; kill -9 + restart; it trains; 2 processes = 1."""
import contextlib
import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from lmfusion_jax.commands import prepare_data as command
from lmfusion_jax.data.prepare import KILL_ENV
from lmfusion_jax.data.prepare.records import square_pixels
from lmfusion_jax.data.tfds_image_captions import image_captions_reader, load_image

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 16   # pixels; the test VAE halves it: latents [8, 8, 4], the tiny config's latent size
WDS_SKIPPED = {"empty_caption": 1, "missing_caption": 1, "missing_image": 1, "non_utf8_caption": 1,
               "shard_error": 1, "too_small": 1, "undecodable_image": 2}
WDS_CAPTIONS = {"s0.tar/k0": "a red square", "s0.tar/k1": "a blue one", "s0.tar/k4": "sixteen bit",
                "s1.tar/k10": "just big enough", "s1.tar/k11": "a wide one", "s2.tar/k12": "twelve",
                "s2.tar/k13": "thirteen"}


def encoded(w, h, fmt="JPEG", mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  if mode == "I;16":
    img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
  else:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def make_webdataset(folder):
  """3 shards: 7 good records, 8 bad ones (2 undecodable, 1 each other reason; s2.tar is cut inside k14)."""
  import webdataset as wds
  folder.mkdir()
  shards = [
      [{"__key__": "k0", "jpg": encoded(20, 16), "txt": b"a red square"},
       {"__key__": "k1", "png": encoded(16, 30, "PNG", "RGBA", 1), "txt": b"a blue one\n"},
       {"__key__": "k2", "jpg": encoded(40, 40, seed=2)[:300], "txt": b"truncated jpeg"},
       {"__key__": "k3", "jpg": np.random.default_rng(3).bytes(500), "txt": b"random bytes"},
       {"__key__": "k4", "png": encoded(18, 18, "PNG", "I;16", 4), "txt": b"sixteen bit"}],
      [{"__key__": "k5", "jpg": encoded(7, 30, seed=5), "txt": b"too small"},
       {"__key__": "k6", "jpg": encoded(20, 20, seed=6), "txt": b"  \n"},
       {"__key__": "k7", "jpg": encoded(20, 20, seed=7)},
       {"__key__": "k8", "jpg": encoded(20, 20, seed=8), "txt": b"caf\xe9 \xff"},
       {"__key__": "k9", "txt": b"no image"},
       {"__key__": "k10", "jpg": encoded(8, 8, seed=10), "txt": b"just big enough"},
       {"__key__": "k11", "jpg": encoded(32, 24, seed=11), "txt": b"a wide one"}],
      [{"__key__": "k12", "jpg": encoded(20, 20, seed=12), "txt": b"twelve"},
       {"__key__": "k13", "png": encoded(24, 20, "PNG", seed=13), "txt": b"thirteen"},
       {"__key__": "k14", "jpg": encoded(30, 30, seed=14), "txt": b"cut off"}]]
  for i, records in enumerate(shards):
    with wds.TarWriter(str(folder / f"s{i}.tar")) as w:
      for r in records:
        w.write(r)
  cut = next(m for m in tarfile.open(folder / "s2.tar").getmembers() if m.name == "k14.jpg").offset_data + 10
  data = (folder / "s2.tar").read_bytes()
  (folder / "s2.tar").write_bytes(data[:cut])
  return str(folder / "s{0..2}.tar")


def run_command(*argv) -> tuple:
  """The command in this process -> (exit code, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = command.main([str(a) for a in argv])
  return code, out.getvalue()


def summary(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def records(data_dir, config="res16") -> dict:
  src = image_captions_reader(data_dir, config).as_data_source("train")
  out = [src[i] for i in range(len(src))]
  ids = [r["id"].decode() for r in out]
  assert len(ids) == len(set(ids)), "a record was written twice"
  return {r["id"].decode(): r for r in out}


@pytest.fixture(scope="module")
def wds(tmp_path_factory, tiny_vae):
  """The webdataset source prepared once with the VAE: (source pattern, data dir, stdout)."""
  root = tmp_path_factory.mktemp("wds")
  source = make_webdataset(root / "shards")
  code, out = run_command("--source", source, "--format", "webdataset", "--out", root / "tfds",
                          "--image-size", SIZE, "--vae-dir", tiny_vae[0], "--batch-size", 4)
  assert code == 0, out
  return source, str(root / "tfds"), out


def test_webdataset_counts_records_and_latents(wds, tiny_vae):
  from lmfusion_jax.data import pipeline
  from lmfusion_jax.models.vae import encode_latents
  source, data_dir, out = wds
  assert summary(out) == {"written": 7, "skipped": WDS_SKIPPED}
  got = records(data_dir)
  assert {k: r["caption"].decode() for k, r in got.items()} == WDS_CAPTIONS
  # build-data's preprocessing (an image file read by tfds_image_captions.load_image), then the VAE
  folder = pathlib.Path(source).parent
  import webdataset as wdsl
  for sample in wdsl.WebDataset(str(folder / "s{0..1}.tar"), shardshuffle=False, empty_check=False):
    rid = f"{pathlib.Path(sample['__url__']).name}/{sample['__key__']}"
    if rid in got:
      image = sample.get("jpg", sample.get("png"))
      (folder / "x").write_bytes(image)
      want = np.asarray(encode_latents(tiny_vae[1], load_image(folder / "x", SIZE)[None]))[0]
      np.testing.assert_allclose(got[rid]["latent"], want, atol=1e-5, err_msg=rid)
  cfg = pipeline.default_data_config()
  cfg.update(dict(dataset="image_captions", data_dir=data_dir, image_size=SIZE))
  source_, shape = pipeline.make_source(cfg, "train")
  assert len(source_) == 7 and shape == (8, 8, 4)
  info = image_captions_reader(data_dir, "res16").info
  assert info.splits["train"].shard_lengths == [3, 2, 2]
  assert info.metadata["skipped"] == WDS_SKIPPED and info.metadata["encode"] == "vae"
  assert "prepare-data: warning:" not in out   # warnings go to stderr
  # run again: nothing to do, the same summary, nothing rewritten
  before = os.stat(pathlib.Path(info.data_dir) / "dataset_info.json").st_mtime_ns
  code, again = run_command("--source", source, "--format", "webdataset", "--out", data_dir, "--image-size",
                            SIZE, "--vae-dir", tiny_vae[0], "--batch-size", 4)
  assert code == 0 and summary(again) == summary(out)
  assert os.stat(pathlib.Path(info.data_dir) / "dataset_info.json").st_mtime_ns == before


def test_json_caption_field_and_changed_options_are_refused(tmp_path, capsys):
  import webdataset as wdsl
  (tmp_path / "src").mkdir()
  with wdsl.TarWriter(str(tmp_path / "src" / "a.tar")) as w:
    w.write({"__key__": "x", "jpg": encoded(20, 20), "txt": b"txt", "json": b'{"alt": "from json"}'})
    w.write({"__key__": "y", "jpg": encoded(20, 20), "json": b'{"other": 1}'})
    w.write({"__key__": "z", "jpg": encoded(20, 20), "json": b"not json"})
  args = ["--source", tmp_path / "src" / "a.tar", "--format", "webdataset", "--out", tmp_path / "tfds",
          "--image-size", SIZE]
  code, out = run_command(*args, "--caption-field", "alt")
  assert code == 0 and summary(out) == {"written": 1, "skipped": {"missing_caption": 2}}
  assert [r["caption"] for r in records(tmp_path / "tfds").values()] == [b"from json"]
  code, _ = run_command(*args)         # the same output dir with other options
  err = capsys.readouterr().err
  assert code == 2 and "was started with other options (caption_field differ)" in err, err


def test_parquet_with_encode_none(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "pq").mkdir()
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  good = [encoded(20, 20, seed=1), encoded(30, 18, "PNG", "LA", seed=2)]
  pq.write_table(pa.table({
      "image": pa.array([{"bytes": good[0], "path": "a.jpg"}, None, {"bytes": b"\x89PNG garbage", "path": None},
                         {"bytes": encoded(4, 40), "path": None}, {"bytes": good[1], "path": None},
                         {"bytes": encoded(20, 20), "path": None}], struct),
      "text": ["one", "two", "three", "four", "five", None]}), tmp_path / "pq" / "a.parquet")
  pq.write_table(pa.table({"jpg": pa.array([encoded(20, 20), encoded(20, 20)], pa.binary()),
                           "text": pa.array([b"\xffbad", b""], pa.binary())}), tmp_path / "pq" / "b.parquet")
  code, out = run_command("--source", tmp_path / "pq" / "*.parquet", "--format", "parquet", "--out",
                          tmp_path / "tfds", "--image-size", SIZE, "--encode", "none", "--caption-field", "text")
  assert code == 0, out
  assert summary(out) == {"written": 2, "skipped": {"empty_caption": 1, "missing_caption": 1, "missing_image": 1,
                                                    "non_utf8_caption": 1, "too_small": 1, "undecodable_image": 1}}
  builder = image_captions_reader(tmp_path / "tfds", "png16")
  src = builder.as_data_source("train")
  assert [(src[i]["id"], src[i]["caption"]) for i in range(2)] == [(b"a.parquet/0", b"one"), (b"a.parquet/4", b"five")]
  for i, data in enumerate(good):
    np.testing.assert_array_equal(src[i]["image"], square_pixels(data, SIZE)[0])   # lossless PNG
  assert sorted(builder.info.metadata["fields"]) == ["caption", "id", "image"]
  # a missing caption column stops the run, naming the file and the columns
  code, _ = run_command("--source", tmp_path / "pq" / "a.parquet", "--format", "parquet", "--out", tmp_path / "t2",
                        "--image-size", SIZE)
  assert code == 2


def test_folder_pixels_are_build_datas(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (tmp_path / "outside.png").write_bytes(encoded(20, 20, "PNG"))
  for i in range(3):
    (src / f"{i}.png").write_bytes(encoded(20 + i, 18, "PNG", seed=i))
  lines = [{"file": "0.png", "caption": "zero"}, {"file": "../outside.png", "caption": "out"},
           {"file": "1.png", "caption": " "}, {"file": "nope.png", "caption": "missing"},
           {"file": "2.png", "caption": "two"}, {"file": "0.png", "caption": "again"}]
  (src / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  code, out = run_command("--source", src, "--format", "folder", "--out", tmp_path / "tfds", "--image-size", SIZE,
                          "--shard-size", 4)
  assert code == 0, out
  assert summary(out) == {"written": 2, "skipped": {"duplicate": 1, "empty_caption": 1, "missing_image": 1,
                                                    "outside_source": 1}}
  got = records(tmp_path / "tfds")
  assert sorted(got) == ["0.png", "2.png"]
  for name, r in got.items():   # pixel space: the image in [-1, 1], bitwise what build-data computes
    np.testing.assert_array_equal(r["latent"], load_image(src / name, SIZE))


def test_kill_during_a_shard_then_restart(wds, tiny_vae, tmp_path):
  """SIGKILLed while its second shard is half written; the restart keeps shard 0, rewrites shard 1: the
  records are those of the uninterrupted run, each once."""
  source, ref_dir, ref_out = wds
  out = tmp_path / "tfds"
  args = ["--source", source, "--format", "webdataset", "--out", out, "--image-size", SIZE,
          "--vae-dir", tiny_vae[0], "--batch-size", 4]
  env = dict(os.environ, **{KILL_ENV: "4", "PYTHONPATH": str(REPO)})
  proc = subprocess.run([sys.executable, "-m", "lmfusion_jax.commands.prepare_data", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  ds = out / "lmfusion_image_captions" / "res16" / "1.0.0"
  assert (ds / "prepare" / "shard-00000.json").exists() and not (ds / "prepare" / "shard-00001.json").exists()
  assert any(".tmp-" in p.name for p in ds.iterdir()), "the half-written shard is left as a temporary"
  assert not (ds / "dataset_info.json").exists()
  code, text = run_command(*args)
  assert code == 0 and summary(text) == summary(ref_out)
  assert not any(".tmp-" in p.name for p in ds.iterdir())
  got, want = records(out), records(ref_dir)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k]["caption"] == want[k]["caption"]
    np.testing.assert_array_equal(got[k]["latent"], want[k]["latent"], err_msg=k)


def test_the_prepared_dataset_trains(wds, tokenizer_dir, tmp_path):
  from lmfusion_jax import cli
  _, data_dir, _ = wds
  code = cli.main(["train", "--config", str(REPO / "configs" / "tiny.py"), f"--config.workdir={tmp_path / 'run'}",
                   "--config.data.dataset=image_captions", f"--config.data.data_dir={data_dir}",
                   f"--config.data.image_size={SIZE}", "--config.data.eval_split=train",
                   f"--config.data.tokenizer_dir={tokenizer_dir}", "--config.fusion.latent_channels=4",
                   "--config.fusion.image_io=linear", "--config.model.n_layers=1", "--config.total_steps=2", "--config.log_every=1",
                   "--config.save_every=2", "--config.tensorboard=false"])
  assert code == 0
  steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [s["step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) for s in steps)


def test_launch_script():
  script = REPO / "launch" / "prepare_data.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "prepare-data" in r.stdout
  r = subprocess.run(["bash", str(script), "--tpu-name", "pod1", "--zone", "z", "--dry-run", "--",
                      "--source", "gs://b/{0..9}.tar", "--format", "webdataset", "--out", "gs://b/tfds",
                      "--image-size", "256"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  (ssh,) = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("gcloud ")]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in ssh
  remote = [a for a in ssh if a.startswith("--command=")][0]
  assert shlex.split(remote.split("nohup ", 1)[1].split(" > ", 1)[0]) == [
      "lmfusion-jax", "prepare-data", "--source", "gs://b/{0..9}.tar", "--format", "webdataset", "--out",
      "gs://b/tfds", "--image-size", "256"]
  assert "~/lmfusion-logs/prepare-data.log" in remote
  r = subprocess.run(["bash", str(script), "--local", "x", "--", "--source", "s"], capture_output=True, text=True)
  assert r.returncode == 2 and "--local needs a process count" in r.stderr


@pytest.mark.slow
def test_two_processes_write_what_one_does(wds, tiny_vae, tmp_path):
  """2 processes x 8 devices (gloo) write the records, and bitwise the latents, that 1 process x 8 devices (this
  one, the `wds` fixture) wrote: the same --batch-size and devices per process give the same batches."""
  from test_train_multiprocess import spawn_processes
  source, ref_dir, ref_out = wds
  procs = spawn_processes(2, [sys.executable, "-m", "lmfusion_jax.commands.prepare_data", "--source", source,
                              "--format", "webdataset", "--out", str(tmp_path / "two"), "--image-size", str(SIZE),
                              "--vae-dir", tiny_vae[0], "--batch-size", "4"], devices_per_process=8)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert summary(outs[0]) == summary(ref_out) == {"written": 7, "skipped": WDS_SKIPPED}
  assert '{"written"' not in outs[1], "only process 0 prints the summary"
  one, two = records(ref_dir), records(tmp_path / "two")
  assert list(one) == list(two)
  for k in one:
    assert one[k]["caption"] == two[k]["caption"]
    np.testing.assert_array_equal(one[k]["latent"], two[k]["latent"], err_msg=k)
  counts = [json.loads(p.read_text()) for p in sorted((tmp_path / "two").glob("*/res16/1.0.0/prepare/shard-*.json"))]
  assert [c["records"] for c in counts] == [3, 2, 2]
