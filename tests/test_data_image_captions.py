"""image_captions builder: folder + captions -> VAE latents; bad images; idempotent rebuild; pipeline."""
import json
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lmfusion_jax.checkpoints.vae import save_vae
from lmfusion_jax.data import pipeline, tokenizer as tk
from lmfusion_jax.data.build import build_dataset
from lmfusion_jax.data.batch import check_batch
from lmfusion_jax.data.tfds_image_captions import BadImageError, CaptionsFileError
from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig, encode_latents

CAPTIONS = ["a red square", "a blue wide photo", "a green tall photo", "a dark noisy picture", "a bright one"]
SIZES = [(20, 20), (40, 24), (18, 30), (16, 16), (33, 17)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  cfg = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
  vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  return save_vae(vae, cfg, tmp_path_factory.mktemp("vae") / "vae"), vae


def _folder(root, fmt="jsonl", broken=False):
  rng = np.random.default_rng(0)
  root.mkdir()
  entries = []
  for i, (cap, (w, h)) in enumerate(zip(CAPTIONS, SIZES)):
    name = f"img{i}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    entries.append({"file": name, "caption": cap})
  if broken:
    (root / "broken.jpg").write_bytes(b"this is not an image")
    entries.insert(2, {"file": "broken.jpg", "caption": "unreadable"})
  if fmt == "jsonl":
    (root / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
  else:
    (root / "captions.csv").write_text("file,caption\n" + "".join(f"{e['file']},{e['caption']}\n" for e in entries))
  return root


def _reference_latent(vae, path, size=8):
  """Independent preprocessing: PIL center crop by hand, bicubic resize, [-1, 1]; then the Flax VAE."""
  img = Image.open(path).convert("RGB")
  w, h = img.size
  s = min(w, h)
  box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
  x = np.asarray(img.crop(box).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
  return np.asarray(encode_latents(vae, x[None]))[0]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_builds_latents_from_folder(tmp_path, vae_dir, fmt):
  vdir, vae = vae_dir
  src = _folder(tmp_path / "src", fmt)
  builder = build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir,
                          image_size=8, batch_size=2)
  ds = builder.as_data_source("train")
  assert len(ds) == 5
  by_id = {ds[i]["id"].decode(): ds[i] for i in range(len(ds))}
  for i, cap in enumerate(CAPTIONS):
    r = by_id[f"img{i}.png"]
    assert r["caption"].decode() == cap
    assert r["latent"].shape == (4, 4, 4)
    np.testing.assert_allclose(r["latent"], _reference_latent(vae, src / f"img{i}.png"), atol=1e-5)
  # idempotent: a second call reuses the dataset; other inputs under the same name are refused
  again = build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir,
                        image_size=8, batch_size=2)
  assert again.info.metadata["fingerprint"] == builder.info.metadata["fingerprint"]
  with pytest.raises(ValueError, match="other inputs"):
    build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir, image_size=8,
                  test_size=1)


def test_unreadable_image_error_or_skip(tmp_path, vae_dir):
  vdir, _ = vae_dir
  src = _folder(tmp_path / "src", broken=True)
  with pytest.raises(BadImageError, match="broken.jpg"):
    build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir, image_size=8)
  assert not (tmp_path / "tfds" / "lmfusion_image_captions" / "res8" / "1.0.0").exists()  # nothing half-written
  builder = build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir,
                          image_size=8, on_bad_image="skip", test_size=1)
  assert list(builder.info.metadata["skipped_images"]) == ["broken.jpg"]
  assert builder.info.splits["train"].num_examples + builder.info.splits["test"].num_examples == 5


def test_malformed_captions_file(tmp_path, vae_dir):
  vdir, _ = vae_dir
  src = tmp_path / "src"
  src.mkdir()
  (src / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n{"file": "b.png"}\n')
  with pytest.raises(CaptionsFileError, match="captions.jsonl:2"):
    build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir, image_size=8)


def test_pipeline_reads_image_captions(tmp_path, vae_dir):
  vdir, _ = vae_dir
  src = _folder(tmp_path / "src")
  data_dir = str(tmp_path / "tfds")
  build_dataset("image_captions", data_dir, source_dir=src, vae_dir=vdir, image_size=8)
  tok = tk.train_tokenizer(CAPTIONS * 10, 300, str(tmp_path / "tok"))
  cfg = pipeline.default_data_config()
  cfg.update(dict(dataset="image_captions", data_dir=data_dir, image_size=8, eval_split="train",
                  global_batch_size=2, text_len=32, image_slots=2, tokens_per_image=4))
  batches = list(pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1))
  for b in batches:
    check_batch(b, 32, 2)
  assert sum(int((b["image_segment_ids"] > 0).sum()) for b in batches) == 5


def _never_read(path, image_size):
  raise AssertionError(f"an image was read ({path}) before every record was checked")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "file_symlink", "folder_symlink"])
def test_records_escaping_the_source_folder_are_refused(tmp_path, vae_dir, monkeypatch, kind):
  """The escaping record comes last, yet it is refused before any image is read or encoded."""
  from lmfusion_jax.data import tfds_image_captions
  vdir, _ = vae_dir
  src = _folder(tmp_path / "src")
  outside = tmp_path / "outside"
  outside.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.png")
  bad = {"dotdot": "../outside/x.png", "absolute": str(outside / "x.png"),
         "file_symlink": "link.png", "folder_symlink": "linkdir/x.png"}[kind]
  if kind == "file_symlink":
    (src / "link.png").symlink_to(outside / "x.png")
  if kind == "folder_symlink":
    (src / "linkdir").symlink_to(outside, target_is_directory=True)
  with open(src / "captions.jsonl", "a") as f:
    f.write(json.dumps({"file": bad, "caption": "escape"}) + "\n")
  monkeypatch.setattr(tfds_image_captions, "load_image", _never_read)
  with pytest.raises(CaptionsFileError, match=re.escape(f"captions.jsonl:6: record file '{bad}' is refused")):
    build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir, image_size=8)
  assert not (tmp_path / "tfds" / "lmfusion_image_captions" / "res8" / "1.0.0").exists()


def test_symlinks_inside_the_source_folder_are_accepted(tmp_path, vae_dir):
  vdir, vae = vae_dir
  src = _folder(tmp_path / "src")
  (src / "sub").mkdir()
  (src / "sub" / "alias.png").symlink_to(src / "img0.png")      # a file symlink within the folder
  (src / "same").symlink_to(src, target_is_directory=True)       # a folder symlink back into it
  with open(src / "captions.jsonl", "a") as f:
    f.write(json.dumps({"file": "sub/alias.png", "caption": "alias"}) + "\n")
    f.write(json.dumps({"file": "same/img1.png", "caption": "via folder link"}) + "\n")
    f.write(json.dumps({"file": "sub/../img2.png", "caption": "dot dot inside"}) + "\n")
  builder = build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir,
                          image_size=8)
  ds = builder.as_data_source("train")
  by_id = {ds[i]["id"].decode(): ds[i] for i in range(len(ds))}
  assert len(by_id) == 8
  np.testing.assert_allclose(by_id["sub/alias.png"]["latent"], _reference_latent(vae, src / "img0.png"), atol=1e-5)
  np.testing.assert_allclose(by_id["same/img1.png"]["latent"], _reference_latent(vae, src / "img1.png"), atol=1e-5)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_non_utf8_captions_file(tmp_path, vae_dir, fmt):
  vdir, _ = vae_dir
  src = _folder(tmp_path / "src", fmt)
  name = f"captions.{fmt}"
  text = (src / name).read_bytes().splitlines(keepends=True)
  text[2] = text[2].replace(b"a", "\u00e9".encode("latin-1"), 1)    # line 3: a Latin-1 byte 0xe9
  (src / name).write_bytes(b"".join(text))
  offset = len(b"".join(text[:2])) + text[2].index(b"\xe9")
  with pytest.raises(CaptionsFileError, match=rf"{name}:3: not UTF-8 \(byte 0xe9 at offset {offset}\)"):
    build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=src, vae_dir=vdir, image_size=8)


def test_bad_build_options_are_user_errors(tmp_path):
  from lmfusion_jax.errors import UserError
  with pytest.raises(UserError, match="unknown dataset 'nope'"):
    build_dataset("nope", str(tmp_path))
  with pytest.raises(UserError, match=r"unknown option\(s\) \['size'\]"):
    build_dataset("digits", str(tmp_path), size=8)
  with pytest.raises(UserError, match=r"unknown option\(s\) \['source'\]"):
    build_dataset("image_captions", str(tmp_path), source="x", vae_dir="y")
  with pytest.raises(UserError, match=r"missing option\(s\) \['vae_dir'\]"):
    build_dataset("image_captions", str(tmp_path), source_dir="x")


def test_build_data_cli_with_relative_paths(tmp_path, vae_dir, monkeypatch, capsys):
  """`build-data image-captions` from another cwd: paths made absolute, so the same folders given as absolute
  paths later are recognised as the same inputs (same fingerprint, no rebuild)."""
  from lmfusion_jax import cli
  vdir, _ = vae_dir
  _folder(tmp_path / "src")
  monkeypatch.chdir(tmp_path)
  assert cli.main(["build-data", "image-captions", "--source", "src", "--vae", str(vdir), "--data-dir", "tfds",
                   "--image-size", "8", "--test-size", "1"]) == 0
  out = capsys.readouterr().out
  assert f"--config.data.data_dir={tmp_path / 'tfds'} " in out and "train 4" in out and "test 1" in out
  monkeypatch.chdir(tmp_path / "src")
  again = build_dataset("image_captions", str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"), vae_dir=vdir,
                        image_size=8, test_size=1)
  assert again.info.splits["train"].num_examples == 4
