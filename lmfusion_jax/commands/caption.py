"""`lmfusion-jax caption`: greedy captions of PNG images (`BOS BOI image EOI` -> text, with a KV cache).

  lmfusion-jax caption --checkpoint WORKDIR --image digit.png
  lmfusion-jax caption --checkpoint CKPT --image a.png --image b.png --tokenizer tok/ --vae vae/ --json

Without --vae the image is the latent itself (pixel-space data such as the digits): it is converted to the
model's channel count (grey or RGB), area-resized to the latent size and mapped from 0..255 to [-1, 1].
With --vae it is resized to the VAE's input size and encoded (posterior mean).

A LLaVA checkpoint (HF LLaVA / LLaVA-NeXT folder, convert-llava checkpoint, LLaVAFusion run) captions through its
vision tower (the understanding path; HF LLaVA's greedy tokens), each image with --prompt (default
"<image>\nDescribe the image."; it must hold <image> once).
"""
from __future__ import annotations

import argparse
import json

from lmfusion_jax.commands.arg_types import positive_int
from lmfusion_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, training step dir (WORKDIR/checkpoints/STEP) or params checkpoint")
  p.add_argument("--image", required=True, action="append", help="PNG/JPEG file; repeat for a batch")
  p.add_argument("--max-new-tokens", type=positive_int, default=32, help="caption length limit (default: %(default)s)")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer folder (default: the one that travels with the checkpoint)")
  p.add_argument("--vae", default=None, help="Flax VAE folder (convert-vae) for latent-space models")
  p.add_argument("--prompt", default=None,
                 help="LLaVA checkpoints: the prompt for every image, holding <image> once (default: "
                      "\"<image>\\nDescribe the image.\")")
  p.add_argument("--json", action="store_true",
                 help='print one JSON object per image: {"image", "caption", "tokens"}')


def run(args) -> int:
  from lmfusion_jax.checkpoints.vae import load_vae
  from lmfusion_jax.data.tokenizer import load_tokenizer
  from lmfusion_jax.inference import caption, loading
  from lmfusion_jax.inference.image_files import latents_from_files
  from lmfusion_jax.progress import Progress

  from lmfusion_jax.inference import llava_generate
  # An explicit --tokenizer is checked before the (slow) parameter restore.
  tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
  if llava_generate.llava_source(args.checkpoint) is not None:
    return _run_llava(args, tokenizer)
  if args.prompt is not None:
    raise UserError("--prompt is for LLaVA checkpoints (an LMFusion model captions from BOS BOI image EOI)")
  loaded = loading.load_model(args.checkpoint)
  tokenizer = tokenizer or load_tokenizer(loading.tokenizer_dir_of(loaded, args.tokenizer))
  vae = load_vae(args.vae)[1] if args.vae else None
  latents = latents_from_files(args.image, loaded.fusion, vae)
  with Progress(len(args.image), "caption", unit="image") as progress:
    ids = caption.caption_latents(loaded.model(), latents, args.max_new_tokens)
    progress.update(len(ids))
  for f, t in zip(args.image, ids):
    text = tokenizer.decode(t, skip_special_tokens=True).strip()
    print(json.dumps({"image": f, "caption": text, "tokens": t}) if args.json else f"{f}: {text}")
  return 0


def _run_llava(args, tokenizer) -> int:
  from lmfusion_jax.inference import llava_answer, llava_generate
  tokenizer = tokenizer or llava_answer.load_tokenizer_for(args.checkpoint)
  llava = llava_generate.load_llava(args.checkpoint)
  prompt = args.prompt if args.prompt is not None else llava_answer.DEFAULT_CAPTION_PROMPT
  answers = llava_answer.answer(llava, tokenizer, args.image, [prompt] * len(args.image), args.max_new_tokens)
  for f, a in zip(args.image, answers):     # one left-padded batch, as the LMFusion path captions
    text = a.text.strip()
    print(json.dumps({"image": f, "caption": text, "tokens": a.tokens}) if args.json else f"{f}: {text}")
  return 0
