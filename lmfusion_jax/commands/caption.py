"""`lmfusion-jax caption`: greedy captions of PNG images (`BOS BOI image EOI` -> text, with a KV cache).

  lmfusion-jax caption --checkpoint WORKDIR --image digit.png
  lmfusion-jax caption --checkpoint CKPT --image a.png --image b.png --tokenizer tok/ --vae vae/ --json

Without --vae the image is the latent itself (pixel-space data such as the digits): it is converted to the
model's channel count (grey or RGB), area-resized to the latent size and mapped from 0..255 to [-1, 1].
With --vae it is resized to the VAE's input size and encoded (posterior mean).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, training step dir (WORKDIR/checkpoints/STEP) or params checkpoint")
  p.add_argument("--image", required=True, action="append", help="PNG/JPEG file; repeat for a batch")
  p.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit (default: %(default)s)")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer folder (default: the training run's data.tokenizer_dir)")
  p.add_argument("--vae", default=None, help="Flax VAE folder (convert-vae) for latent-space models")
  p.add_argument("--json", action="store_true",
                 help='print one JSON object per image: {"image", "caption", "tokens"}')


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """Image file -> float32 [size, size, channels] in [-1, 1] (area resize)."""
  from PIL import Image
  try:
    img = Image.open(path)
    img.load()
  except Exception as e:  # PIL raises several types for unreadable files
    raise ValueError(f"--image {path}: cannot read the image ({type(e).__name__}: {e})") from e
  if channels not in (1, 3):
    raise ValueError(f"--image {path}: the model has {channels} image channels; only 1 (grey) or 3 (RGB) "
                     f"can be read from an image file")
  img = img.convert("L" if channels == 1 else "RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.Resampling.BOX)
  x = np.asarray(img, np.float32) / 127.5 - 1.0
  return x[:, :, None] if x.ndim == 2 else x


def run(args) -> int:
  import jax.numpy as jnp
  from lmfusion_jax.inference import caption
  from lmfusion_jax.inference import loading as model_loading
  from lmfusion_jax.data.tokenizer import load_tokenizer
  from lmfusion_jax.models import sharded

  loaded = model_loading.load_model(args.checkpoint)
  fcfg = loaded.fusion
  tokenizer = load_tokenizer(model_loading.tokenizer_dir_of(loaded, args.tokenizer))
  if args.vae:
    from lmfusion_jax.convert.diffusers_vae import load_vae
    from lmfusion_jax.models.vae import jit_encode_latents
    vcfg, vae = load_vae(args.vae)
    factor = 2 ** (len(vcfg.block_out_channels) - 1)
    pixels = np.stack([load_image(f, fcfg.latent_size * factor, vcfg.in_channels) for f in args.image])
    latents = np.asarray(jit_encode_latents(vae)(jnp.asarray(pixels)))
  else:
    latents = np.stack([load_image(f, fcfg.latent_size, fcfg.latent_channels) for f in args.image])
  model = sharded.merge(*sharded.graphdef_and_abstract_state(loaded.llama, fcfg), loaded.params)
  ids = caption.caption_latents(model, latents, args.max_new_tokens)
  for f, t in zip(args.image, ids):
    text = tokenizer.decode(t, skip_special_tokens=True).strip()
    print(json.dumps({"image": f, "caption": text, "tokens": t}) if args.json else f"{f}: {text}")
  return 0
