"""`lmfusion-jax eval` on several processes and from files: 1 process x 4 devices and 2 processes x 2 devices give
the same numbers (held-out metrics; images, Inception statistics and FID from a prompt file); a prompt-file run
reuses the images already on disk; an image folder is captioned and scored by CIDEr-D, resumably; bad inputs."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from test_train_multiprocess import env_with_devices, spawn_processes

REPO = pathlib.Path(__file__).resolve().parent.parent
# Small and fast: few records, 4 sampling steps, batches that split evenly over 2 and 4 devices.
FAST = ["--config.eval.num_examples=8", "--config.eval.batch_size=4", "--config.data.global_batch_size=4",
        "--config.eval.sampling_steps=4", "--config.eval.samples_per_class=1"]


def eval_cmd(*args):
  return [sys.executable, "-m", "lmfusion_jax.cli", "eval", *args]


def run_single(args, devices=4, cwd=None):
  out = subprocess.run(eval_cmd(*args), env=env_with_devices(devices), capture_output=True, text=True, cwd=cwd,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def run_two_processes(args, cwd=None):
  procs = spawn_processes(2, eval_cmd(*args), cwd=cwd)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  return logs


def last_json(text):
  return json.loads(text.strip().splitlines()[-1])


def assert_same_numbers(a: dict, b: dict, skip=("processes",)):
  assert set(a) == set(b)
  for k in a:
    if k in skip:
      continue
    if isinstance(a[k], float):
      assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k   # float reduction order inside a batch
    else:
      assert a[k] == b[k], k


def random_inception(folder):
  """A FID Inception with random (He-normal) convolutions, saved as convert-inception does."""
  from lmfusion_jax.convert.inception_weights import convert_state_dict, save_inception, torch_layout
  rng = np.random.default_rng(0)
  sd = {}
  for key, (_, shape) in torch_layout().items():
    if key.endswith("conv.weight"):
      sd[key] = (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    elif key.endswith(("running_var", "bn.weight")):
      sd[key] = np.ones(shape, np.float32)
    else:
      sd[key] = np.zeros(shape, np.float32)
  save_inception(convert_state_dict(sd), folder)
  return str(folder)


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
  return random_inception(tmp_path_factory.mktemp("inception") / "inc")


@pytest.mark.slow
def test_held_out_eval_is_the_same_on_one_and_two_processes(frozen_run):
  cfg, _ = frozen_run
  args = ["--checkpoint", cfg.workdir, "--config.eval.evaluators=('text_nll','diffusion_loss','captioning')", *FAST]
  one = last_json(run_single(args).stdout)
  logs = run_two_processes(args)
  two = last_json(logs[0])
  assert one["processes"] == 1 and two["processes"] == 2 and one["devices"] == two["devices"] == 4
  assert_same_numbers(one, two)
  assert one["text_tokens"] > 0 and one["diffusion_loss_mean"] > 0
  assert not any(line.startswith("{") for line in logs[1].splitlines())   # only process 0 prints the result


PROMPTS = ["a handwritten digit five", "a handwritten digit zero", "a handwritten digit two"]


def write_prompts(path):
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS) + "\n")
  return path


@pytest.mark.slow
def test_prompt_eval_one_vs_two_processes_and_resume(frozen_run, inception_dir, tmp_path):
  """Images and their Inception statistics: 1 x 4 devices == 2 processes x 2 devices; the second run finds
  3 of its 6 images on disk (what a stopped run leaves) and draws only the other 3."""
  cfg, _ = frozen_run
  write_prompts(tmp_path / "prompts.jsonl")
  common = ["--checkpoint", cfg.workdir, "--prompts", "../prompts.jsonl", "--num-images", "6",
            "--inception", inception_dir, *FAST]
  (tmp_path / "a").mkdir()
  one = last_json(run_single([*common, "--out", "out_one"], cwd=tmp_path / "a").stdout)
  assert one["images_drawn"] == 6 and one["images_reused"] == 0
  images_two = tmp_path / "b/out_two/images"
  images_two.mkdir(parents=True)
  for i in (0, 3, 4):
    (images_two / f"{i:06d}.png").write_bytes((tmp_path / f"a/out_one/images/{i:06d}.png").read_bytes())
  stamps = {p.name: p.stat().st_mtime_ns for p in images_two.iterdir()}
  two = last_json(run_two_processes([*common, "--out", "out_two"], cwd=tmp_path / "b")[0])
  assert two["images_reused"] == 3 and two["images_drawn"] == 3 and two["processes"] == 2
  assert {p: (images_two / p).stat().st_mtime_ns for p in stamps} == stamps   # not redrawn
  from PIL import Image
  for i in range(6):
    a = np.asarray(Image.open(tmp_path / f"a/out_one/images/{i:06d}.png"), np.int16)
    b = np.asarray(Image.open(images_two / f"{i:06d}.png"), np.int16)
    assert np.abs(a - b).max() <= 1, i    # the same noise per image; float order may move a pixel by one level
  skip = ("images_reused", "images_drawn", "processes")
  assert_same_numbers({k: v for k, v in one.items() if k not in skip},
                      {k: v for k, v in two.items() if k not in skip})
  with np.load(tmp_path / "a/out_one/generated_stats.npz") as a, \
       np.load(tmp_path / "b/out_two/generated_stats.npz") as b:
    assert a["mu"].shape == (2048,) and np.abs(a["mu"]).max() > 0
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-3, atol=1e-5 * np.abs(a["sigma"]).max())
  for out in (tmp_path / "a/out_one", tmp_path / "b/out_two"):
    assert json.loads((out / "results.json").read_text())["num_images"] == 6
    assert (out / "contact_sheet.png").exists() and PROMPTS[0] in (out / "report.md").read_text()
    lines = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == PROMPTS * 2


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
  from clip_models import make_hf_clip
  return make_hf_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.mark.slow
def test_prompt_eval_fid_and_clip_score(frozen_run, inception_dir, hf_clip_dir, tmp_path, monkeypatch, capsys):
  """FID against reference statistics (fid-stats of real digits) and CLIP score, through the command: both equal
  the library functions applied to the PNGs the command wrote."""
  from lmfusion_jax.cli import main
  from lmfusion_jax.evaluation.metrics.clip_score import clip_score
  from lmfusion_jax.evaluation.setup import read_records
  from lmfusion_jax.inference.image_files import float_to_uint8, write_png
  from PIL import Image
  cfg, _ = frozen_run
  monkeypatch.chdir(tmp_path)
  for r in read_records(cfg.data, cfg.data.eval_split, 4):
    write_png(tmp_path / "real" / f"{r['id']}.png", float_to_uint8(r["latent"]))
  assert main(["fid-stats", "--images", "real", "--inception", inception_dir, "--out", "ref.npz",
               "--batch-size", "4"]) == 0
  assert main(["convert-clip", "--hf-dir", str(hf_clip_dir), "--out", "clip"]) == 0
  write_prompts(tmp_path / "prompts.jsonl")
  # the Frechet distance of 2048-d statistics takes about a minute here (scipy's sqrtm, pytorch-fid's recipe):
  # compute it once, and record what the command hands to it
  from lmfusion_jax.evaluation.metrics import fid as fid_lib
  seen = []
  real_distance = fid_lib.frechet_distance
  monkeypatch.setattr(fid_lib, "frechet_distance", lambda *a, **k: seen.append(a) or real_distance(*a, **k))
  assert main(["eval", "--checkpoint", os.path.relpath(cfg.workdir), "--prompts", "prompts.jsonl",
               "--inception", inception_dir, "--reference-stats", "ref.npz", "--clip", "clip", "--out", "gen",
               *FAST]) == 0
  result = last_json(capsys.readouterr().out)
  assert result["num_images"] == 3 and result["fid_reference"] == str(tmp_path / "ref.npz")
  assert np.isfinite(result["fid"]) and result["fid"] > 0 and len(seen) == 1
  # the distance was taken between the reference file's statistics and those of the written PNGs
  assert main(["fid-stats", "--images", "gen/images", "--inception", inception_dir, "--out", "gen.npz",
               "--batch-size", "4"]) == 0
  with np.load("ref.npz") as ref, np.load("gen.npz") as gen, np.load("gen/generated_stats.npz") as written:
    np.testing.assert_array_equal(seen[0][0], ref["mu"])
    np.testing.assert_array_equal(seen[0][1], ref["sigma"])
    np.testing.assert_array_equal(seen[0][2], written["mu"])
    np.testing.assert_allclose(written["mu"], gen["mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(written["sigma"], gen["sigma"], rtol=1e-5, atol=1e-7 * np.abs(gen["sigma"]).max())
  images = [np.asarray(Image.open(f"gen/images/{i:06d}.png").convert("RGB")) for i in range(3)]
  want, per_pair = clip_score("clip", images, PROMPTS)
  assert result["clip_score"] == pytest.approx(want, rel=1e-5) and len(per_pair) == 3


def test_caption_folder_cider_and_resume(frozen_run, tmp_path, monkeypatch, capsys):
  from lmfusion_jax.cli import main
  from lmfusion_jax.evaluation import metrics
  from lmfusion_jax.evaluation.setup import prepare, read_records
  from lmfusion_jax.inference.caption import caption_images
  from lmfusion_jax.inference.image_files import float_to_uint8, latents_from_files, write_png
  cfg, _ = frozen_run
  records = read_records(cfg.data, cfg.data.eval_split, 6)
  folder = tmp_path / "images"
  refs = []
  for j, r in enumerate(records):
    name = f"{'sub/' if j % 2 else ''}{j:02d}.png"
    write_png(folder / name, float_to_uint8(r["latent"]))
    refs.append({"file": name, "captions": [r["caption"], "a picture of a number"]})
  (tmp_path / "refs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in refs))
  monkeypatch.chdir(tmp_path)
  args = ["eval", "--checkpoint", os.path.relpath(cfg.workdir), "--captions-for", "images", "--references",
          "refs.jsonl", "--out", "caps", "--config.eval.batch_size=4"]
  assert main(args) == 0
  result = last_json(capsys.readouterr().out)
  got = [json.loads(x) for x in (tmp_path / "caps/captions.jsonl").read_text().splitlines()]
  files = sorted(x["file"] for x in refs)
  assert [g["file"] for g in got] == files and result["num_images"] == 6
  # independent of the command: the same files captioned directly, and CIDEr-D of those captions
  s = prepare(cfg.workdir, with_records=False)
  want = caption_images(s.model, s.tokenizer, latents_from_files([str(folder / f) for f in files], s.loaded.fusion),
                        max_new_tokens=int(s.cfg.eval.caption_max_new_tokens), batch_size=4)
  assert [g["caption"] for g in got] == want
  by_file = {x["file"]: x["captions"] for x in refs}
  assert result["cider_d"] == metrics.cider_d(dict(zip(files, want)), {f: by_file[f] for f in files})[0]
  # resume: the captions of one batch are lost; only they are redone
  parts = sorted((tmp_path / "caps/captions").iterdir())
  assert len(parts) == 2
  parts[0].unlink()
  assert main(args) == 0
  again = last_json(capsys.readouterr().out)
  assert again["captions_reused"] == 2 and again["cider_d"] == result["cider_d"]
  # an unreadable image: refused by default naming it, or skipped and counted
  (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  with open(tmp_path / "refs.jsonl", "a") as f:
    f.write(json.dumps({"file": "zz_broken.png", "caption": "nothing"}) + "\n")
  assert main(args) == 2
  assert "zz_broken.png" in capsys.readouterr().err
  assert main(args + ["--on-bad-image", "skip"]) == 0
  out = capsys.readouterr()
  assert last_json(out.out)["skipped_unreadable"] == 1 and "zz_broken.png" in out.out + out.err
  # an image without references is refused, naming it
  write_png(folder / "extra.png", float_to_uint8(records[0]["latent"]))
  assert main(args) == 2
  assert "no references for image 'extra.png'" in capsys.readouterr().err


def test_prompt_eval_bad_inputs(frozen_run, inception_dir, tmp_path, capsys):
  from lmfusion_jax.cli import main
  cfg, _ = frozen_run
  base = ["eval", "--checkpoint", cfg.workdir, "--out", str(tmp_path / "out")]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a digit"}\n\n{"prompt": "a digit", \n')
  assert main(base + ["--prompts", str(bad)]) == 2
  assert "bad.jsonl:3: not a JSON object" in capsys.readouterr().err
  bad.write_text('{"prompt": "a digit"}\n{"text": "no prompt field"}\n')
  assert main(base + ["--prompts", str(bad)]) == 2
  assert 'bad.jsonl:2: needs a non-empty string field "prompt"' in capsys.readouterr().err
  good = tmp_path / "good.jsonl"
  good.write_text('{"prompt": "a digit"}\n')
  np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  assert main(base + ["--prompts", str(good), "--inception", inception_dir, "--reference-stats",
                      str(tmp_path / "small.npz")]) == 2
  assert "small.npz: FID statistics have mu [64]" in capsys.readouterr().err
  assert main(base + ["--prompts", str(good), "--reference-stats", str(tmp_path / "small.npz")]) == 2
  assert main(["eval", "--checkpoint", cfg.workdir, "--prompts", str(good)]) == 2
  assert "needs --out" in capsys.readouterr().err
  assert main(["eval", "--checkpoint", cfg.workdir, "--inception", inception_dir]) == 2
  assert "--inception belongs to the prompt-file mode" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
