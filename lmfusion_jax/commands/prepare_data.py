"""`lmfusion-jax prepare-data`: web-scale image-caption shards (webdataset .tar, parquet) or a folder -> the
image_captions TFDS dataset `train` reads (ArrayRecord; build-data's format), on one host or all of them.

  lmfusion-jax prepare-data --source 'gs://b/laion/{00000..09999}.tar' --format webdataset \\
      --out gs://b/tfds --image-size 256 --vae-dir gs://b/vae
  lmfusion-jax prepare-data --source 'data/*.parquet' --format parquet --caption-field text --out tfds \\
      --image-size 256 --encode none

Images: decoded with PIL, 8-bit RGB (16-bit scaled, transparency on white), center-cropped, resized to S with
PIL's bicubic filter (build-data's steps, bitwise), then VAE-encoded (posterior mean), batched and jitted over
this host's devices. Without --vae-dir the S x S RGB image in [-1, 1] is the latent (pixel space, like the
digits); --encode none stores the S x S image as PNG instead (config png{S}), for online encoding later.
Bad records are skipped and counted by reason (undecodable_image, too_small: short side < S/2,
missing_image, missing_caption, empty_caption, non_utf8_caption, outside_source, duplicate,
nonfinite_latent, shard_error); the last stdout line is {"written": n, "skipped": {reason: count}}.
Multi-host: run the same command on every host (launch/prepare_data.sh); host p takes input shards p, p+P, ...
Input shard k becomes output shard k, committed atomically: a killed run, restarted, goes on where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys

from lmfusion_jax.commands.arg_types import positive_int
from lmfusion_jax.errors import UserError

FORMATS = ("webdataset", "parquet", "folder")
HELP = ("image-caption shards (webdataset .tar, parquet) or a folder -> the image_captions dataset (VAE latents), "
        "over every host, resumable")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--source", required=True,
                 help="input shards: a brace and/or glob pattern ('shards/{00000..00099}.tar', 'pq/*.parquet'), "
                      "or (--format folder) a folder with the images and captions.jsonl / captions.csv")
  p.add_argument("--format", required=True, choices=FORMATS, help="what --source holds")
  p.add_argument("--out", required=True, help="TFDS data dir to write into (local or gs://; shared by all hosts)")
  p.add_argument("--image-size", type=positive_int, required=True, help="image side S in pixels")
  p.add_argument("--vae-dir", "--vae", dest="vae_dir", default=None,
                 help="Flax VAE checkpoint folder (lmfusion-jax convert-vae); without it the pixels are the latents")
  p.add_argument("--encode", choices=("vae", "none"), default="vae",
                 help="vae: store latents (default); none: store the S x S image as PNG + caption")
  p.add_argument("--caption-field", default=None,
                 help="webdataset: the caption is this field of key.json (default: key.txt); parquet: the caption "
                      "column (default: caption)")
  p.add_argument("--image-field", default=None,
                 help="parquet: the image column (default: the first of jpg, jpeg, png, webp, image, image.bytes, "
                      "img; binary or a struct with 'bytes')")
  p.add_argument("--batch-size", type=positive_int, default=16,
                 help="images per VAE call over this host's devices (rounded up to a multiple of the local "
                      "device count; default: %(default)s)")
  p.add_argument("--config-name", default=None,
                 help="builder config name (default: res{S}, or png{S} with --encode none)")
  p.add_argument("--shard-size", type=positive_int, default=1000,
                 help="folder: records per output shard (the unit of work and of restart; default: %(default)s)")
  p.add_argument("--workers", type=positive_int, default=None,
                 help="image decoding threads per host (default: min(8, CPU count))")


def run(args) -> int:
  import jax

  from lmfusion_jax.checkpoints.files import absolute_path
  from lmfusion_jax.data.prepare import prepare_data
  from lmfusion_jax.run_config import base_config
  from lmfusion_jax.training import distributed

  for flag in ("source", "out", "vae_dir"):
    if getattr(args, flag, None):
      setattr(args, flag, absolute_path(getattr(args, flag)))
  distributed.initialize(base_config().distributed)   # several processes: from the environment
  result = prepare_data(args.source, args.format, args.out, args.image_size, vae_dir=args.vae_dir,
                        encode=args.encode, caption_field=args.caption_field, image_field=args.image_field,
                        batch_size=args.batch_size, config_name=args.config_name, shard_size=args.shard_size,
                        workers=args.workers)
  if jax.process_index() == 0:
    print(f"prepare-data: {result['written']} records in {result['num_shards']} shards: {result['dataset_dir']}")
    if result["encode"] != "none":
      h, _, c = result["latent_shape"]
      print(f"prepare-data: latents {result['latent_shape']}: the model needs fusion.latent_size={h}, "
            f"fusion.latent_channels={c}")
      fields = ["--config.data.dataset=image_captions", f"--config.data.data_dir={args.out}",
                f"--config.data.image_size={args.image_size}", "--config.data.eval_split=train"]
      if args.config_name:
        fields.append(f"--config.data.builder_config={args.config_name}")
      print("train with: lmfusion-jax train " + " ".join(fields))
    print(json.dumps({"written": result["written"], "skipped": result["skipped"]}), flush=True)
  return 0


def main(argv=None) -> int:
  """`python -m lmfusion_jax.commands.prepare_data ...`: the command on its own (what the CLI runs)."""
  from lmfusion_jax import logs
  argv = list(sys.argv[1:] if argv is None else argv)
  logs.configure(verbose="-v" in argv or "--verbose" in argv)
  parser = argparse.ArgumentParser(prog="lmfusion-jax prepare-data", description=HELP)
  parser.add_argument("-v", "--verbose", action="store_true", help="let the libraries log")
  add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    return int(run(args) or 0)
  except UserError as e:
    print(f"lmfusion-jax prepare-data: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
