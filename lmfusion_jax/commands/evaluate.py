"""`lmfusion-jax eval`: evaluate a checkpoint on any mesh, on one or several processes. Three modes:

Held-out metrics of the run's dataset (default), printed as one JSON object:
  lmfusion-jax eval --checkpoint WORKDIR [--config configs/tiny.py] [--config.eval.num_examples=300]
  text NLL/perplexity of held-out captions as plain text, diffusion loss at fixed timesteps
  (--config.eval.timesteps), CIDEr-D of greedy captions, and for labelled data captioning accuracy,
  generation accuracy (a classifier fitted on the real training images) and FID in that classifier's feature
  space. Without --config the training run's recorded config is used.

Images from a prompt file (the paper's FID / CLIP score setting), resumable:
  lmfusion-jax eval --checkpoint C --prompts prompts.jsonl [--num-images N] [--inception DIR
      --reference-stats ref.npz] [--clip DIR] --out OUT [--vae V]
  prompts.jsonl: one {"prompt": "..."} a line. Writes OUT/images/NNNNNN.png (already there: reused),
  images.jsonl, contact_sheet.png, generated_stats.npz (with --inception), results.json, report.md.
  Sampling: the run's recorded settings (or the paper's DDPM 250 steps + CFG 1.55 for a convert output),
  overridden with --config.eval.{sampler,sampling_steps,cfg_scale,eta,seed}.

Captions of an image folder against references (CIDEr-D), resumable:
  lmfusion-jax eval --checkpoint C --captions-for IMAGES/ --references refs.jsonl --out OUT [--vae V]
  refs.jsonl: one {"file": "rel/path.jpg", "captions": ["...", ...]} a line, for every image.

Several processes (hosts): start the same command on each (TPU VMs find each other; elsewhere set
LMFUSION_COORDINATOR, LMFUSION_NUM_PROCESSES, LMFUSION_PROCESS_ID as launch/local_multihost.sh does). Each
process holds the model on its own devices and takes every P-th record / prompt / image; results are gathered
once, so the numbers equal a single process's. OUT must be storage every process sees (gs://, NFS).
Eval knobs live under --config.eval.* (num_examples, batch_size, samples_per_class, num_generated,
sampling_steps, sampler, cfg_scale, eta, clip_x0, seed, noise_seed, timesteps, caption_max_new_tokens,
vae_dir, fid).
"""
from __future__ import annotations

import argparse

from lmfusion_jax.commands.arg_types import non_negative_int, output_file, positive_int

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="training workdir, training step dir (WORKDIR/checkpoints/STEP) or params checkpoint")
  p.add_argument("--config", default=None,
                 help="config file (get_config), e.g. configs/tiny.py; default: the run's recorded config")
  p.add_argument("--step", type=non_negative_int, default=None, help="training step to evaluate (default: latest)")
  p.add_argument("--output", default=None, type=output_file,
                 help="held-out mode: also write the JSON to this file (atomically; missing parent folders are "
                      "created). Checked before anything is computed: it must not be a folder or lie under a file")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
  p.add_argument("--vae", default=None, help="Flax VAE folder (convert-vae) for latent models "
                                             "(same as --config.eval.vae_dir)")
  g = p.add_argument_group("prompt-file mode")
  g.add_argument("--prompts", default=None, help="prompts .jsonl ({\"prompt\": ...} a line): draw images for them")
  g.add_argument("--num-images", type=positive_int, default=None,
                 help="images to draw (default: one per prompt; image i takes prompt i mod the prompt count)")
  g.add_argument("--inception", default=None, help="FID Inception folder (convert-inception): FID statistics")
  g.add_argument("--reference-stats", default=None,
                 help="reference FID statistics .npz (fid-stats or pytorch-fid's): FID against them")
  g.add_argument("--clip", default=None, help="CLIP folder (convert-clip): CLIP score of the images vs prompts")
  g = p.add_argument_group("image-folder mode")
  g.add_argument("--captions-for", default=None, help="folder of images to caption (read recursively)")
  g.add_argument("--references", default=None,
                 help="references .jsonl ({\"file\": ..., \"captions\": [...]} a line): CIDEr-D against them")
  g.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                 help="an unreadable image: stop naming it (error, the default) or leave it out and count it")
  p.add_argument("--out", default=None, help="output folder of the prompt-file and image-folder modes")


def _check(args) -> str:
  from lmfusion_jax.errors import UserError
  mode = "prompts" if args.prompts else ("captions" if args.captions_for else "held-out")
  if args.prompts and args.captions_for:
    raise UserError("--prompts and --captions-for: give one (two evaluations are two commands)")
  if mode != "held-out" and not args.out:
    raise UserError(f"--{'prompts' if args.prompts else 'captions-for'} needs --out DIR")
  if mode == "captions" and not args.references:
    raise UserError("--captions-for needs --references refs.jsonl")
  prompt_only = [f for f, v in (("--num-images", args.num_images), ("--inception", args.inception),
                                ("--reference-stats", args.reference_stats), ("--clip", args.clip)) if v]
  if prompt_only and mode != "prompts":
    raise UserError(f"{prompt_only[0]} belongs to the prompt-file mode (--prompts FILE)")
  if args.references and mode != "captions":
    raise UserError("--references belongs to the image-folder mode (--captions-for DIR)")
  return mode


def run(args) -> int:
  import json

  import jax

  from lmfusion_jax.checkpoints.files import write_text
  from lmfusion_jax.evaluation.evaluate import evaluate, to_json
  from lmfusion_jax.evaluation.setup import prepare
  from lmfusion_jax.run_config import base_config
  from lmfusion_jax.training import distributed

  mode = _check(args)
  distributed.initialize(base_config().distributed)   # several processes: from the environment
  overrides = list(args.overrides) + ([f"--config.eval.vae_dir={args.vae}"] if args.vae else [])
  if mode == "held-out":
    result = evaluate(args.checkpoint, args.config, overrides, step=args.step, tokenizer_dir=args.tokenizer)
    text = to_json(result)
  else:
    setup = prepare(args.checkpoint, args.config, overrides, step=args.step, with_records=False,
                    tokenizer_dir=args.tokenizer)
    if mode == "prompts":
      from lmfusion_jax.evaluation.prompt_images import run_prompt_eval
      result = run_prompt_eval(setup, args.prompts, args.out, args.num_images, args.reference_stats,
                               args.inception, args.clip)
    else:
      from lmfusion_jax.evaluation.caption_folder import run_caption_eval
      result = run_caption_eval(setup, args.captions_for, args.references, args.out, args.on_bad_image)
    text = json.dumps(result, sort_keys=True)
  if jax.process_index() == 0:
    print(text, flush=True)  # first, so the metrics are not lost if writing --output fails
    if args.output:
      write_text(args.output, text + "\n")
  return 0
