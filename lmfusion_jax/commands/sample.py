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


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, training step dir (WORKDIR/checkpoints/STEP) or params checkpoint")
  p.add_argument("--prompt", required=True, action="append",
                 help="caption to draw; repeat the flag for several prompts")
  p.add_argument("--num", type=int, default=4, help="images per prompt (default: %(default)s)")
  p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                 help="ddpm: ancestral sampling; ddim: deterministic for --eta 0 (default: %(default)s)")
  p.add_argument("--steps", type=int, default=None,
                 help="denoising steps out of the training schedule (default: 250 for ddpm, 50 for ddim)")
  p.add_argument("--cfg", type=float, default=1.0,
                 help="classifier-free guidance scale w: eps_u + w (eps_c - eps_u); 1 = no guidance "
                      "(default: %(default)s)")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (ddim only)")
  p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
  p.add_argument("--clip-x0", type=float, default=None,
                 help="clip the predicted clean latent to [-X, X]; default 1 without --vae (pixel data), "
                      "off with --vae; 0 = off")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer folder (default: the training run's data.tokenizer_dir)")
  p.add_argument("--vae", default=None,
                 help="Flax VAE folder (convert-vae) to decode latents; omit for pixel-space data (digits)")
  p.add_argument("--scale", type=int, default=0,
                 help="integer upscaling of the written PNGs (default: up to at least 64 pixels)")
  p.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (slower)")
  p.add_argument("--out", required=True, help="output folder for PNGs and contact_sheet.png")


def run(args) -> int:
  from lmfusion_jax.checkpoints.files import write_json
  from lmfusion_jax.checkpoints.vae import load_vae
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  from lmfusion_jax.inference import image, image_files, loading

  if args.num < 1:
    raise ValueError(f"--num {args.num}: must be >= 1")
  loaded = loading.load_model(args.checkpoint)
  tokenizer = load_tokenizer(loading.tokenizer_dir_of(loaded, args.tokenizer))
  encode = CaptionEncoder(tokenizer)
  vae = load_vae(args.vae)[1] if args.vae else None
  clip = args.clip_x0 if args.clip_x0 is not None else (None if vae else 1.0)
  clip = None if clip == 0 else clip
  steps = args.steps or (250 if args.sampler == "ddpm" else 50)
  prompts = [p for p in args.prompt for _ in range(args.num)]
  latents = image.generate_images(
      loaded.model(), [encode(p) for p in prompts], loaded.diffusion, num_steps=steps, sampler=args.sampler,
      cfg_scale=args.cfg, seed=args.seed, eta=args.eta, clip_x0=clip, use_cache=not args.no_cache,
      pad_id=special_ids(tokenizer)["pad"])
  images = image_files.decode_to_images(latents, vae)
  scale = args.scale or max(1, -(-64 // images.shape[1]))
  written = image_files.write_samples(images, args.out, scale=scale, columns=args.num)
  manifest = [{"file": os.path.basename(f), "prompt": p} for f, p in zip(written["images"], prompts)]
  write_json(os.path.join(args.out, "prompts.json"), manifest, sort_keys=False)
  print(f"wrote {len(written['images'])} images and {written['contact_sheet']} "
        f"({args.sampler}, {steps} steps, cfg {args.cfg}, seed {args.seed})")
  return 0
