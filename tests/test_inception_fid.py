"""Inception FID against pytorch-fid (0.3.0): the Flax FID Inception-v3 vs pytorch-fid's network with the same
(random, BN-calibrated) weights, the bilinear resize vs torch, the statistics and the distance vs pytorch-fid's
code, the two commands, and bad inputs.

pytorch-fid (and the torchvision it needs) live in `.reference/` and run in their own process
(tests/reference/pytorch_fid_reference.py says why); its pretrained weights are not downloadable here, so that
process builds its network offline with random weights and writes them in pytorch-fid's file layout."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmfusion_jax.cli import main
from lmfusion_jax.errors import UserError
from lmfusion_jax.evaluation.metrics import fid as fid_lib
from lmfusion_jax.evaluation.metrics import inception as inc

sys.path.insert(0, str(pathlib.Path(__file__).parent / "reference"))
from pytorch_fid_reference import real_looking  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_PACKAGES = REPO / ".reference"
BATCH = 3   # every Flax call below runs batches of 3: the network compiles once
SIZES = [(64, 64), (80, 100), (320, 320)]   # up-sized, up-sized non-square, down-sized
PNG_SIZES = [(64, 64), (80, 100), (64, 64), (320, 320), (80, 100)]


def _png_folder(folder, sizes):
  from lmfusion_jax.inference.image_files import write_png
  for i, (h, w) in enumerate(sizes):
    img = np.round(real_looking(100 + i, 1, h, w)[0] * 255).astype(np.uint8)
    write_png(folder / f"img_{i:02d}.png", img)


def _distance_inputs():
  """Two sets of 128-d statistics (sqrtm of a 2048 x 2048 product takes about a minute on 2 cores; the recipe
  does not depend on D)."""
  rng = np.random.default_rng(0)
  d = 128
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  a = rng.normal(size=(400, d)) @ mix
  b = rng.normal(size=(300, d)) @ (mix + 0.1 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.2
  return fid_lib.gaussian_stats(a), fid_lib.gaussian_stats(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's results, computed once in its own process: {"weights": .pth path, "features": {(h, w): [N,
  2048]}, "png_folder", "png_stats": (mu, sigma), "distance_stats": (a, b), "distance"}; plus "model": the
  Flax network converted from those weights and "state_dict": the weights as numpy arrays."""
  from lmfusion_jax.convert.inception_weights import convert_inception, read_state_dict
  if not (REFERENCE_PACKAGES / "pytorch_fid").is_dir():
    raise RuntimeError(f"{REFERENCE_PACKAGES} has no pytorch_fid: run the README's test command, which installs "
                       "`pip install --no-deps --upgrade --target .reference pytorch-fid==0.3.0 "
                       "torchvision==0.28.0`")
  work = tmp_path_factory.mktemp("pytorch_fid")
  for h, w in SIZES:
    np.save(work / f"images_{h}x{w}.npy", real_looking(h + w, BATCH, h, w))
  (work / "real").mkdir()
  _png_folder(work / "real", PNG_SIZES)
  pngs = sorted(str(p) for p in (work / "real").glob("*.png"))
  sa, sb = _distance_inputs()
  np.savez(work / "stats_a.npz", mu=sa[0], sigma=sa[1])
  np.savez(work / "stats_b.npz", mu=sb[0], sigma=sb[1])
  (work / "job.json").write_text(json.dumps({"features": [f"{h}x{w}" for h, w in SIZES], "pngs": pngs,
                                             "distance": True}))
  env = dict(os.environ, PYTHONPATH=str(REFERENCE_PACKAGES))
  subprocess.run([sys.executable, str(REPO / "tests" / "reference" / "pytorch_fid_reference.py"), str(work)],
                 env=env, check=True, timeout=600)
  with np.load(work / "png_stats.npz") as f:
    png_stats = (f["mu"], f["sigma"])
  weights = str(work / "weights.pth")
  return {"weights": weights, "model": convert_inception(weights), "state_dict": read_state_dict(weights),
          "features": {(h, w): np.load(work / f"features_{h}x{w}.npy") for h, w in SIZES},
          "png_folder": work / "real", "png_stats": png_stats, "distance_stats": (sa, sb),
          "distance": json.loads((work / "distance.json").read_text())["distance"]}


@pytest.mark.parametrize("h,w", SIZES + [(299, 299), (600, 17), (1024, 777)])
def test_resize_matches_torch_bilinear(h, w):
  x = real_looking(h * w, 2, h, w)
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inc.resize_bilinear(x))
  assert got.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)   # float32 rounding: measured <= 1.2e-7


@pytest.mark.parametrize("h,w", SIZES)
def test_features_match_pytorch_fid(reference, h, w):
  model = reference["model"]
  x = real_looking(h + w, BATCH, h, w)
  want = reference["features"][(h, w)]
  got = inc.inception_features(model, x, BATCH)
  assert got.shape == (BATCH, 2048) and got.dtype == np.float64
  # Two float32 implementations through 94 conv + BN units: measured max |diff| 1.0e-4 .. 1.2e-4 on features up
  # to 4..13 (pytorch-fid's own float32 result is 2e-4 .. 1.1e-3 from its float64 result on the same input).
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)
  # a list of differently sized images goes through the same per-image resize
  mixed = inc.inception_features(model, [x[0], real_looking(1, 1, 50, 70)[0], x[2]], BATCH)
  np.testing.assert_allclose(mixed[[0, 2]], got[[0, 2]], rtol=0, atol=1e-5)


def test_distance_matches_pytorch_fid(reference, tmp_path):
  sa, sb = reference["distance_stats"]
  want = reference["distance"]
  np.savez(tmp_path / "a.npz", mu=sa[0], sigma=sa[1])
  np.savez(tmp_path / "b.npz", mu=sb[0], sigma=sb[1])
  assert abs(fid_lib.fid_from_stats(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), dim=None) - want) <= 1e-6
  assert abs(fid_lib.fid_from_stats(sa, sb, dim=sa[0].shape[0]) - want) <= 1e-6
  assert want > 0.1


def test_fid_stats_cli_matches_pytorch_fid(reference, tmp_path, monkeypatch):
  (tmp_path / "run").mkdir()
  monkeypatch.chdir(tmp_path / "run")
  assert main(["convert-inception", "--weights", os.path.relpath(reference["weights"]), "--out", "../inc"]) == 0
  assert main(["fid-stats", "--images", os.path.relpath(reference["png_folder"]), "--inception", "../inc",
               "--out", "../real.npz", "--batch-size", str(BATCH)]) == 0
  with np.load(tmp_path / "real.npz") as f:
    assert sorted(f.files) == ["mu", "sigma"]
    mu, sigma = f["mu"], f["sigma"]
  assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
  # pytorch-fid end to end (its PNG reading, its float32 torch network, its statistics): equal up to the float32
  # feature differences
  mu_t, sigma_t = reference["png_stats"]
  scale = max(1.0, float(np.abs(mu_t).max()))
  assert np.abs(mu - mu_t).max() <= 1e-4 * scale
  assert np.abs(sigma - sigma_t).max() <= 1e-4 * scale * max(1.0, float(np.abs(sigma_t).max()) ** 0.5)
  assert fid_lib.load_fid_stats(tmp_path / "real.npz")[0].shape == (2048,)
  # the converted folder reloads bit for bit
  from lmfusion_jax.convert.inception_weights import load_inception
  again = load_inception(tmp_path / "inc")
  model = reference["model"]
  np.testing.assert_array_equal(np.asarray(again.Mixed_7c.branch_pool.kernel[...]),
                                np.asarray(model.Mixed_7c.branch_pool.kernel[...]))


# ---- bad inputs ----------------------------------------------------------------------------------------------

def _convert(tmp_path, weights, capsys):
  path = tmp_path / "w.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, path)
  rc = main(["convert-inception", "--weights", str(path), "--out", str(tmp_path / "out")])
  return rc, capsys.readouterr().err


def test_other_architecture_weights_refused(reference, tmp_path, capsys):
  weights = reference["state_dict"]
  bad = dict(weights, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 1, 5), np.float32)})
  rc, err = _convert(tmp_path, bad, capsys)
  assert rc == 2 and "Mixed_6b.branch7x7_2.conv.weight" in err and "[128, 128, 1, 7]" in err
  missing = {k: v for k, v in weights.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
  rc, err = _convert(tmp_path, missing, capsys)
  assert rc == 2 and "missing tensor 'Mixed_7c.branch_pool.bn.running_var'" in err and "w.pth" in err
  aux = dict(weights, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)})
  rc, err = _convert(tmp_path, aux, capsys)
  assert rc == 2 and "unexpected tensor 'AuxLogits.conv0.conv.weight'" in err
  imagenet = dict(weights, **{"fc.weight": np.zeros((1000, 2048), np.float32),
                              "fc.bias": np.zeros(1000, np.float32)})
  rc, err = _convert(tmp_path, imagenet, capsys)   # torchvision's ImageNet Inception: another network
  assert rc == 2 and "'fc.weight'" in err and "[1008, 2048]" in err
  assert not (tmp_path / "out").exists()
  (tmp_path / "junk.pth").write_bytes(b"not a torch file")
  rc = main(["convert-inception", "--weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "out")])
  assert rc == 2 and "junk.pth" in capsys.readouterr().err


def test_safetensors_weights_convert(reference, tmp_path):
  import safetensors.numpy
  from lmfusion_jax.convert.inception_weights import convert_inception
  model, weights = reference["model"], reference["state_dict"]
  path = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path))
  again = convert_inception(str(path))
  np.testing.assert_array_equal(np.asarray(again.Conv2d_1a_3x3.kernel[...]),
                                np.asarray(model.Conv2d_1a_3x3.kernel[...]))


def test_wrong_dimension_stats_refused(tmp_path):
  np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  np.savez(tmp_path / "full.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(UserError, match=r"small\.npz.*mu \[64\] and sigma \[64, 64\].*\[2048\], \[2048, 2048\]"):
    fid_lib.fid_from_stats(str(tmp_path / "full.npz"), str(tmp_path / "small.npz"))
  np.savez(tmp_path / "nokey.npz", mean=np.zeros(2048))
  with pytest.raises(UserError, match=r"nokey\.npz.*'mu' and 'sigma'"):
    fid_lib.load_fid_stats(tmp_path / "nokey.npz")
  np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(UserError, match=r"a\.npz.*3-dimensional.*small\.npz.*64-dimensional"):
    fid_lib.fid_from_stats(str(tmp_path / "a.npz"), str(tmp_path / "small.npz"), dim=None)


def test_fid_stats_bad_image(reference, tmp_path, capsys):
  from lmfusion_jax.convert.inception_weights import save_inception
  save_inception(reference["model"], tmp_path / "inc")
  folder = tmp_path / "imgs"
  (folder / "sub").mkdir(parents=True)
  _png_folder(folder / "sub", [(64, 64), (64, 64), (64, 64)])
  (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  (folder / "notes.txt").write_text("not an image: ignored")
  args = ["fid-stats", "--images", str(folder), "--inception", str(tmp_path / "inc"), "--batch-size", str(BATCH)]
  assert main(args + ["--out", str(tmp_path / "e.npz")]) == 2
  err = capsys.readouterr().err
  assert "b_corrupt.png" in err and "--on-bad-image skip" in err and not (tmp_path / "e.npz").exists()
  assert main(args + ["--out", str(tmp_path / "s.npz"), "--on-bad-image", "skip"]) == 0
  out = capsys.readouterr()
  assert "3 images, 1 unreadable skipped" in out.out and "b_corrupt.png" in out.err
  assert fid_lib.load_fid_stats(tmp_path / "s.npz")[1].shape == (2048, 2048)
  assert main(args + ["--out", str(tmp_path / "s.npz")]) == 2   # exists, no --overwrite
  assert "already exists" in capsys.readouterr().err
