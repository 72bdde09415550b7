"""`lmfusion-jax fid-stats`: Inception pool3 statistics (mu, sigma) of an image folder, in pytorch-fid's .npz.

  lmfusion-jax fid-stats --images real/ --inception inception_fid/ --out real.npz
  lmfusion-jax fid-stats --images samples/ --inception inception_fid/ --out samples.npz --on-bad-image skip

Every image file under --images (bmp jpg jpeg pgm png ppm tif tiff webp, sub-folders included, sorted) is read as
RGB in [0, 1], resized to 299 x 299 (bilinear, as torch) and run through the FID Inception converted by
`lmfusion-jax convert-inception`; mu = the mean and sigma = the unbiased covariance (np.cov) of the features are
written, float64, like pytorch-fid's `--save-stats`. The file is usable by pytorch-fid and by
`lmfusion_jax.evaluation.metrics.fid.fid_from_stats`. Unreadable files stop the run, naming the file
(--on-bad-image error, the default), or are left out, each named in a warning and counted (skip).
"""
from __future__ import annotations

import argparse
import os
import sys

from lmfusion_jax.commands.arg_types import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n\n", 1)[1]
  p.add_argument("--images", required=True, help="folder of image files (read recursively)")
  p.add_argument("--inception", required=True, help="converted FID Inception folder (convert-inception)")
  p.add_argument("--out", required=True, help="output statistics file (.npz)")
  p.add_argument("--batch-size", type=positive_int, default=50, help="images per batch (default: %(default)s)")
  p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                 help="an unreadable image file: stop naming it (error, the default) or leave it out and "
                      "count it (skip)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
  from lmfusion_jax.checkpoints.files import OutputExistsError, absolute_path
  from lmfusion_jax.convert.inception_weights import load_inception
  from lmfusion_jax.errors import UserError
  from lmfusion_jax.evaluation.metrics.fid import gaussian_stats, save_fid_stats
  from lmfusion_jax.evaluation.metrics.inception import folder_features, list_images
  from lmfusion_jax.progress import Progress

  out, folder = absolute_path(args.out), absolute_path(args.images)
  if not out.endswith(".npz"):
    raise UserError(f"--out {args.out}: the statistics file must end in .npz (pytorch-fid's format)")
  if os.path.exists(out) and not args.overwrite:
    raise OutputExistsError(f"--out {out}: already exists (pass --overwrite to replace it)")
  total = len(list_images(folder))   # refuses a missing or image-less folder before the model loads
  model = load_inception(absolute_path(args.inception))
  with Progress(total, "fid-stats", unit="image") as progress:
    feats, used, bad = folder_features(model, folder, args.batch_size, args.on_bad_image, progress.update)
  for path, reason in bad:
    print(f"fid-stats: warning: skipped unreadable image: {reason}", file=sys.stderr)
  if len(used) < 2:
    raise UserError(f"--images {folder}: {len(used)} readable image(s); statistics need at least 2")
  mu, sigma = gaussian_stats(feats)
  save_fid_stats(mu, sigma, out)
  skipped = f", {len(bad)} unreadable skipped" if bad else ""
  print(f"fid-stats: wrote {out} ({len(used)} images{skipped}; mu [{mu.shape[0]}], "
        f"sigma [{sigma.shape[0]}, {sigma.shape[1]}])")
  return 0
