"""Does an LMFusion run read its captions? The held-out diffusion loss (the eval's, caption-first order, fixed noise)
with every caption replaced by the caption of an image of another class, minus the loss with the true captions.
A model whose image prediction uses the caption loses when given the wrong one; 0 = the caption is ignored.

  python benchmarks/conditioning_gap.py --checkpoint WORKDIR [--step N] [--examples 200] [--timesteps 300 600 900]

Needs labelled eval records (digits, MNIST). Prints one JSON line: {t: [loss with true captions, gap]}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np


def wrong_captions(labels, caption_ids, seed: int = 0) -> list:
  """For each record, the caption ids of a record of another label (drawn with `seed`)."""
  rng = np.random.RandomState(seed)
  by_label = {}
  for i, label in enumerate(labels):
    by_label.setdefault(label, []).append(i)
  if len(by_label) < 2:
    raise SystemExit("conditioning_gap: the eval records hold one label only; nothing to swap")
  out = []
  for label in labels:
    other = rng.choice([k for k in by_label if k != label])
    out.append(caption_ids[rng.choice(by_label[other])])
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="training workdir, step dir or params checkpoint")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--examples", type=int, default=200, help="held-out records (default: %(default)s)")
  p.add_argument("--timesteps", type=int, nargs="+", default=[300, 600, 900])
  args = p.parse_args(argv)
  from lmfusion_jax.evaluation import setup
  from lmfusion_jax.evaluation.diffusion_loss import DiffusionLoss
  ts = ",".join(str(t) for t in args.timesteps)
  s = setup.prepare(args.checkpoint, overrides=[f"--config.eval.num_examples={args.examples}",
                                                f"--config.eval.timesteps=({ts},)"], step=args.step)
  true = DiffusionLoss().run(s)
  swapped = DiffusionLoss().run(dataclasses.replace(
      s, caption_ids=wrong_captions([r["label"] for r in s.records], s.caption_ids)))
  print(json.dumps({k: [true[k], swapped[k] - true[k]] for k in true}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
