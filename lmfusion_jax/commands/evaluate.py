"""`lmfusion-jax eval`: held-out metrics of a checkpoint on any mesh, printed as one JSON object.

  lmfusion-jax eval --checkpoint WORKDIR --config configs/tiny.py --config.data.data_dir=/tmp/tfds \
      --config.data.tokenizer_dir=/tmp/tok --config.eval.num_examples=300 --config.eval.samples_per_class=20

Metrics: text NLL/perplexity of held-out captions as plain text, diffusion loss at fixed timesteps
(--config.eval.timesteps), CIDEr-D of greedy captions, and for labelled data captioning accuracy,
generation accuracy (a classifier fitted on the real training images) and FID in that classifier's
feature space. Without --config the training run's recorded config is used. Eval knobs live under
--config.eval.* (num_examples, batch_size, samples_per_class, num_generated, sampling_steps, sampler,
cfg_scale, eta, clip_x0, seed, noise_seed, timesteps, caption_max_new_tokens, vae_dir, fid).
"""
from __future__ import annotations

import argparse

from lmfusion_jax.commands.arg_types import non_negative_int, output_file

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
                 help="also write the JSON to this file (atomically; missing parent folders are created). "
                      "Checked before anything is computed: it must not be a folder or lie under a file")


def run(args) -> int:
  from lmfusion_jax.checkpoints.files import write_text
  from lmfusion_jax.evaluation.evaluate import evaluate, to_json
  result = evaluate(args.checkpoint, args.config, args.overrides, step=args.step)
  text = to_json(result)
  print(text, flush=True)  # first, so the metrics are not lost if writing --output fails
  if args.output:
    write_text(args.output, text + "\n")
  return 0
