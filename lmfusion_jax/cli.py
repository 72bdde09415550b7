"""The `lmfusion-jax` command: one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `lmfusion-jax --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lmfusion_jax import logs
from lmfusion_jax.errors import UserError


# name -> (module, one-line help)
COMMANDS = {
    "demo": ("lmfusion_jax.commands.demo", "the built-in demo: digits, text LM, convert, LMFusion, eval, report"),
    "build-data": ("lmfusion_jax.commands.build_data",
                   "prepare a dataset (digits or image-captions) once, optionally with a tokenizer"),
    "prepare-data": ("lmfusion_jax.commands.prepare_data",
                     "image-caption shards (webdataset .tar, parquet) or a folder -> the image_captions dataset "
                     "(VAE latents), over every host, resumable"),
    "train": ("lmfusion_jax.commands.train", "train LMFusion (image side; text frozen by default)"),
    "convert-llama": ("lmfusion_jax.commands.convert_llama",
                      "Hugging Face Llama safetensors -> params checkpoint (text + initialized image branch)"),
    "convert-llava": ("lmfusion_jax.commands.convert_llava",
                      "Hugging Face LLaVA / LLaVA-NeXT -> params checkpoint (text + vision + image branch)"),
    "export-llava": ("lmfusion_jax.commands.export_llava",
                     "LLaVA params checkpoint -> Hugging Face LLaVA / LLaVA-NeXT folder, bit for bit"),
    "convert-vae": ("lmfusion_jax.commands.convert_vae",
                    "diffusers AutoencoderKL (safetensors) -> Flax VAE checkpoint"),
    "convert-inception": ("lmfusion_jax.commands.convert_inception",
                          "pytorch-fid's Inception-v3 weights (.pth / safetensors) -> Flax FID Inception"),
    "fid-stats": ("lmfusion_jax.commands.fid_stats",
                  "Inception FID statistics (mu, sigma; pytorch-fid's .npz) of an image folder"),
    "convert-clip": ("lmfusion_jax.commands.convert_clip",
                     "Hugging Face CLIPModel (safetensors + tokenizer) -> Flax CLIP checkpoint (for CLIP score)"),
    "export-llama": ("lmfusion_jax.commands.export_llama",
                     "text branch of any checkpoint -> Hugging Face Llama folder (+ its tokenizer)"),
    "generate": ("lmfusion_jax.commands.generate_text",
                 "generate text from any checkpoint's text branch with a KV cache (greedy or top-p sampling)"),
    "sample": ("lmfusion_jax.commands.sample", "text-to-image sampling (DDPM/DDIM, CFG) -> PNGs + contact sheet"),
    "caption": ("lmfusion_jax.commands.caption", "greedy captions of image files"),
    "eval": ("lmfusion_jax.commands.evaluate",
             "held-out metrics (text NLL, diffusion loss, CIDEr-D, accuracies, FID) as JSON, on any mesh"),
    "eval-text": ("lmfusion_jax.commands.eval_text",
                  "lm-evaluation-harness text tasks (HellaSwag, ...) on the text branch of any checkpoint"),
    "plan": ("lmfusion_jax.commands.plan",
             "compile the train step for a TPU topology on this host: HBM fit, FLOPs, step time, MFU"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="lmfusion-jax",
      description="LMFusion in JAX: convert Llama-3 checkpoints, train the image side with the text side "
                  "frozen, sample, caption and evaluate from sharded checkpoints.")
  parser.add_argument("-v", "--verbose", action="store_true",
                       help="let libtpu, absl, orbax and TFDS print their logs and warnings (quiet by default)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    # also accepted after the subcommand; SUPPRESS keeps the main parser's value when absent here
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if name == argv_command:
      importlib.import_module(module).add_arguments(p)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Before any subcommand module (and JAX, libtpu, orbax) is imported: quiet unless -v/--verbose.
  head = argv[:argv.index("--")] if "--" in argv else argv
  logs.configure(verbose="-v" in head or "--verbose" in head)
  command = next((a for a in argv if not a.startswith("-")), None)
  parser = build_parser(command if command in COMMANDS else None)
  args, extra = parser.parse_known_args(argv)
  if not args.command:
    parser.print_help()
    return 2
  module = importlib.import_module(COMMANDS[args.command][0])
  if extra and not getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.key=value)")
  args.overrides = extra
  try:
    return int(module.run(args) or 0)
  except UserError as e:
    # The user's to fix (lmfusion_jax.errors): the message alone. Anything else is a bug (ours or a
    # library's) and propagates with its traceback (exit 1), so it is never mistaken for bad input.
    print(f"lmfusion-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
