"""`lmfusion-jax sample`: text-to-image sampling from a checkpoint, written as PNGs plus a contact sheet.

  lmfusion-jax sample --checkpoint WORKDIR --prompt "a handwritten digit seven" --num 16 --out samples/
  lmfusion-jax sample --checkpoint CKPT --prompt "a cat" --prompt "a dog" --sampler ddim --steps 50 --cfg 3 \
      --tokenizer tok/ --vae vae/ --out samples/

The caption prefix's K/V is computed once and reused at every denoising step. Parameters are restored onto
a mesh over whatever devices exist.
"""
from __future__ import annotations

import argparse
import os

from lmfusion_jax.commands.arg_types import (finite_float, non_empty_str, non_negative_float, non_negative_int,
                                             positive_int, unit_interval)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, training step dir (WORKDIR/checkpoints/STEP) or params checkpoint")
  p.add_argument("--prompt", required=True, action="append", type=non_empty_str,
                 help="caption to draw; repeat the flag for several prompts")
  p.add_argument("--num", type=positive_int, default=4, help="images per prompt (default: %(default)s)")
  p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None,
                 help="ddpm: ancestral sampling; ddim: deterministic for --eta 0 (default: the run's "
                      "sampling.sampler; ddpm for a params checkpoint)")
  p.add_argument("--steps", type=positive_int, default=None,
                 help="denoising steps out of the training schedule (default: the run's sampling.steps; 250)")
  p.add_argument("--cfg", type=finite_float, default=None,
                 help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u); 1 = no guidance "
                      "(default: the run's sampling.cfg_scale; 1.55, the paper's, for a params checkpoint)")
  p.add_argument("--eta", type=unit_interval, default=None,
                 help="DDIM eta in [0, 1] (ddim only; default: the run's sampling.eta; 0)")
  p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
  p.add_argument("--clip-x0", type=non_negative_float, default=None,
                 help="clip the predicted clean latent to [-X, X]; default 1 without --vae (pixel data), "
                      "off with --vae; 0 = off")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer folder (default: the one that travels with the checkpoint)")
  p.add_argument("--vae", default=None,
                 help="Flax VAE folder (convert-vae) to decode latents; omit for pixel-space data (digits)")
  p.add_argument("--scale", type=non_negative_int, default=0,
                 help="integer upscaling of the written PNGs (default: up to at least 64 pixels)")
  p.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (slower)")
  p.add_argument("--out", required=True, help="output folder for PNGs and contact_sheet.png")


def run(args) -> int:
  from lmfusion_jax.checkpoints.files import write_json
  from lmfusion_jax.checkpoints.vae import load_vae
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  from lmfusion_jax.inference import image, image_files, loading
  from lmfusion_jax.progress import Progress

  from lmfusion_jax.errors import UserError

  if args.num < 1:
    raise UserError(f"--num {args.num}: must be >= 1")
  # The run's recorded sampling defaults (run_config.json `sampling`), each overridden by its flag.
  from lmfusion_jax.run_config import sampling_defaults
  run_defaults = sampling_defaults(loading.recorded_run_config(args.checkpoint))
  sampler = args.sampler or run_defaults["sampler"]
  steps = args.steps if args.steps is not None else int(run_defaults["steps"])
  cfg_scale = args.cfg if args.cfg is not None else float(run_defaults["cfg_scale"])
  eta = args.eta if args.eta is not None else (float(run_defaults["eta"]) if sampler == "ddim" else 0.0)
  if eta and sampler != "ddim":
    raise UserError(f"--eta {eta}: applies to the ddim sampler only (this run samples with {sampler}; "
                    f"pass --sampler ddim)")
  # An explicit --tokenizer is checked before the (slow) parameter restore.
  tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
  loaded = loading.load_model(args.checkpoint)
  tokenizer = tokenizer or load_tokenizer(loading.tokenizer_dir_of(loaded, args.tokenizer))
  encode = CaptionEncoder(tokenizer)
  vae = load_vae(args.vae)[1] if args.vae else None
  clip = args.clip_x0 if args.clip_x0 is not None else (None if vae else 1.0)
  clip = None if clip == 0 else clip
  prompts = [p for p in args.prompt for _ in range(args.num)]
  with Progress(len(prompts), f"sample ({steps} steps)", unit="image") as progress:
    latents = image.generate_images(
        loaded.model(), [encode(p) for p in prompts], loaded.diffusion, num_steps=steps, sampler=sampler,
        cfg_scale=cfg_scale, seed=args.seed, eta=eta, clip_x0=clip, use_cache=not args.no_cache,
        pad_id=special_ids(tokenizer)["pad"], progress=progress)
  images = image_files.decode_to_images(latents, vae)
  scale = args.scale or max(1, -(-64 // images.shape[1]))
  written = image_files.write_samples(images, args.out, scale=scale, columns=args.num)
  manifest = [{"file": os.path.basename(f), "prompt": p} for f, p in zip(written["images"], prompts)]
  write_json(os.path.join(args.out, "prompts.json"), manifest, sort_keys=False)
  print(f"wrote {len(written['images'])} images and {written['contact_sheet']} "
        f"({sampler}, {steps} steps, cfg {cfg_scale}, seed {args.seed})")
  return 0
