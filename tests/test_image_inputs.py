"""Image files -> pixels for both readers (inference.image_files.load_image: grey or RGB, area resize;
data.tfds_image_captions.load_image: RGB, center crop, bicubic): 16-bit, 32-bit and transparent images,
checked against numpy formulas on the raw values and PIL's own compositing."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lmfusion_jax.data.tfds_image_captions import load_image as data_load_image
from lmfusion_jax.inference.image_files import load_image as infer_load_image

WHITE = (255, 255, 255, 255)


def to_float(u8) -> np.ndarray:
  """0..255 -> [-1, 1], the readers' last step."""
  return np.asarray(u8, np.float32) / 127.5 - 1.0


def check_both(path, ref_rgb: np.ndarray, ref_grey: np.ndarray = None):
  """Both readers at the image's own (square) size, where no resize happens, against 8-bit references."""
  size = ref_rgb.shape[0]
  np.testing.assert_allclose(data_load_image(path, size), to_float(ref_rgb), atol=1e-6)
  np.testing.assert_allclose(infer_load_image(str(path), size, 3), to_float(ref_rgb), atol=1e-6)
  if ref_grey is not None:
    np.testing.assert_allclose(infer_load_image(str(path), size, 1), to_float(ref_grey)[..., None], atol=1e-6)


def png_rgb16(path, raw: np.ndarray):
  """Writes uint16 [H, W, 3] as a 48-bit PNG by hand (zlib + struct; PIL cannot write this mode)."""
  h, w, _ = raw.shape
  rows = b"".join(b"\x00" + raw[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                   + chunk(b"IEND", b""))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path, rng):
  raw = rng.integers(0, 65536, (8, 8)).astype(np.uint16)     # [H, W]
  raw[0, :4] = [0, 128, 129, 65535]
  Image.fromarray(raw).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode == "I;16"
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g16.png")), raw)
  ref = np.round(raw / 257.0)                                  # nearest 8-bit level of v / 65535
  assert ref.max() == 255 and ref.min() == 0 and len(np.unique(ref)) > 20
  check_both(tmp_path / "g16.png", np.repeat(ref[..., None], 3, -1), ref)


def test_16bit_grey_resized_and_cropped(tmp_path, rng):
  """A non-square 16-bit image through each reader's resize, on the 8-bit data computed here."""
  raw = rng.integers(0, 65536, (12, 20)).astype(np.uint16)
  Image.fromarray(raw).save(tmp_path / "g16.png")
  ref8 = Image.fromarray(np.round(raw / 257.0).astype(np.uint8), "L")
  box = ref8.resize((8, 8), Image.Resampling.BOX)
  np.testing.assert_allclose(infer_load_image(str(tmp_path / "g16.png"), 8, 1), to_float(box)[..., None], atol=1e-6)
  crop = ref8.convert("RGB").crop((4, 0, 16, 12)).resize((6, 6), Image.BICUBIC)
  np.testing.assert_allclose(data_load_image(tmp_path / "g16.png", 6), to_float(crop), atol=1e-6)


def test_32bit_integer_image_is_16bit_range_clipped(tmp_path, rng):
  raw = rng.integers(-1000, 70000, (8, 8)).astype(np.int32)
  raw[0, :2] = [-5, 100000]
  Image.fromarray(raw).save(tmp_path / "i32.tif")
  assert Image.open(tmp_path / "i32.tif").mode == "I"
  ref = np.round(np.clip(raw, 0, 65535) / 257.0)
  check_both(tmp_path / "i32.tif", np.repeat(ref[..., None], 3, -1), ref)


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path, rng):
  """PIL decodes 48-bit PNGs to 8-bit RGB itself, keeping the high byte (v >> 8)."""
  raw = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
  png_rgb16(tmp_path / "rgb16.png", raw)
  ref = raw >> 8
  assert np.abs(ref - raw / 257.0).max() <= 1.0
  grey = np.asarray(Image.fromarray(ref.astype(np.uint8), "RGB").convert("L"))
  check_both(tmp_path / "rgb16.png", ref, grey)


def test_rgba_is_composited_onto_white(tmp_path, rng):
  rgba = rng.integers(0, 256, (8, 8, 4)).astype(np.uint8)
  rgba[0, :3, 3] = [0, 255, 128]
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  composite = Image.alpha_composite(Image.new("RGBA", (8, 8), WHITE), Image.open(tmp_path / "rgba.png"))
  ref = np.asarray(composite.convert("RGB"))
  a = rgba[..., 3:] / 255.0                                    # the formula alpha_composite implements
  np.testing.assert_allclose(ref, rgba[..., :3] * a + 255 * (1 - a), atol=1)
  np.testing.assert_array_equal(ref[0, 0], [255, 255, 255])
  check_both(tmp_path / "rgba.png", ref, np.asarray(composite.convert("L")))


def test_grey_alpha_is_composited_onto_white(tmp_path, rng):
  la = rng.integers(0, 256, (8, 8, 2)).astype(np.uint8)
  la[0, 0, 1] = 0
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  assert Image.open(tmp_path / "la.png").mode == "LA"
  a = la[..., 1] / 255.0
  ref = la[..., 0] * a + 255 * (1 - a)                         # [H, W]
  got = infer_load_image(str(tmp_path / "la.png"), 8, 1)[..., 0]
  np.testing.assert_allclose(got, to_float(ref), atol=1.01 / 127.5)
  assert got[0, 0] == 1.0
  np.testing.assert_allclose(data_load_image(tmp_path / "la.png", 8), to_float(ref)[..., None].repeat(3, -1),
                             atol=1.01 / 127.5)


def test_palette_with_transparent_index(tmp_path, rng):
  palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
  idx = rng.integers(0, 4, (8, 8)).astype(np.uint8)
  img = Image.fromarray(idx, "P")
  img.putpalette(palette.tobytes())
  img.save(tmp_path / "p.png", transparency=2)
  assert Image.open(tmp_path / "p.png").mode == "P" and "transparency" in Image.open(tmp_path / "p.png").info
  ref = np.where((idx == 2)[..., None], 255, palette[idx])    # [H, W, 3]
  assert (idx == 2).any()
  check_both(tmp_path / "p.png", ref)
