"""Evaluation from a prompt file (the paper's setting: one image per COCO caption, FID and CLIP score):

  run_prompt_eval(setup, prompts_file, out_dir, num_images, reference_stats, inception_dir, clip_dir)

Prompts: a .jsonl file, one JSON object a line with a non-empty "prompt" (or "caption") string; blank lines are
skipped; image i is drawn for prompt i mod (number of prompts) with noise from (eval.seed, i) alone.

Written under OUT (each file atomically):
  images/000000.png ...   one per image; already there (a restarted or extended run): reused, not redrawn
  images.jsonl            {"index", "file", "prompt"} per image
  contact_sheet.png       the first 64 images
  generated_stats.npz     Inception pool3 mu / sigma of the images (with --inception; pytorch-fid's format)
  results.json            settings and metrics; report.md the same as a page

Several processes: each draws the missing images i with i % P == p and writes them; after a barrier each reads
its share of ALL images back for the metrics (so reused and new images are measured the same way, from the
PNG), and the features / scores are gathered once. OUT must be storage every process sees (gs://, NFS).
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

from etils import epath

import jax
import numpy as np

from lmfusion_jax.checkpoints.files import absolute_path, write_text
from lmfusion_jax.errors import UserError
from lmfusion_jax.evaluation import distributed
from lmfusion_jax.evaluation.generation import sample_batched
from lmfusion_jax.evaluation.jsonl_files import read_records
from lmfusion_jax.evaluation.setup import EvalSetup
from lmfusion_jax.inference.image_files import contact_sheet, decode_to_images, write_png
from lmfusion_jax.progress import Progress

SHEET_IMAGES = 64


class PromptFileError(UserError):
  """A prompts file that cannot be read (names the file and line)."""


def read_prompts(path) -> list[str]:
  """The prompts of a .jsonl file (see the module docstring); errors name the file and line."""
  def parse(record):
    text = record.get("prompt", record.get("caption")) if isinstance(record, dict) else None
    return text.strip() if isinstance(text, str) and text.strip() else None
  return read_records("--prompts", path, parse, 'a non-empty string field "prompt" (or "caption")',
                      PromptFileError)


def image_file(out_dir: str, i: int) -> str:
  return os.path.join(out_dir, "images", f"{i:06d}.png")


def _read_png(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as img:
    return np.asarray(img.convert("RGB"))


def _sampling_settings(s: EvalSetup) -> dict:
  ev = s.cfg.eval
  return {"sampler": ev.sampler, "steps": int(ev.sampling_steps), "cfg_scale": float(ev.cfg_scale),
          "eta": float(ev.eta), "seed": int(ev.seed)}


def generate_missing(s: EvalSetup, prompts: list[str], num_images: int, out_dir: str) -> tuple[int, int]:
  """Draws and writes every image of range(num_images) not already in OUT/images (this process: its share).
  Returns (images reused, images drawn by all processes)."""
  images = epath.Path(out_dir) / "images"
  on_disk = {p.name for p in images.iterdir()} if images.exists() else set()   # one listing, also on gs://
  have = {i for i in range(num_images) if os.path.basename(image_file(out_dir, i)) in on_disk}
  distributed.barrier("prompt eval: listed images")   # nobody writes before everybody has listed
  missing = [i for i in range(num_images) if i not in have]
  mine = distributed.share(missing)
  ids = [s.encode(prompts[i % len(prompts)]) for i in mine]

  def write(batch_ids, latents):
    for i, img in zip(batch_ids, decode_to_images(latents, s.vae)):
      write_png(image_file(out_dir, i), img)

  if mine:
    sample_batched(s.model, ids, mine, s.loaded.diffusion, s.cfg.eval, s.clip_x0, s.special["pad"],
                   desc="eval images", on_batch=write)
  distributed.barrier("prompt eval: images written")
  return len(have), len(missing)


def image_metrics(paths: list[str], captions: list[str], inception_dir: Optional[str], clip_dir: Optional[str],
                  batch_size: int, out_dir: str, reference_stats: Optional[str]) -> dict:
  """FID (with Inception weights and reference statistics; the generated statistics are written either way
  when Inception is given) and CLIP score (with CLIP weights), from the image files; each process reads
  its share."""
  out = {}
  mine = distributed.share(range(len(paths)))

  def over_my_images(desc: str, fn) -> dict:
    """{i: row of fn(indices)} over this process's images, a batch at a time."""
    local = {}
    with Progress(len(mine), desc, unit="image") as progress:
      for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        local.update(zip(chunk, fn(chunk)))
        progress.update(len(chunk))
    return local

  if inception_dir:
    from lmfusion_jax.convert.inception_weights import load_inception
    from lmfusion_jax.evaluation.metrics import fid as fid_lib
    from lmfusion_jax.evaluation.metrics.inception import FEATURE_DIM, inception_features
    model = load_inception(inception_dir)
    local = over_my_images("eval inception", lambda chunk: inception_features(
        model, [_read_png(paths[i]).astype(np.float32) / 255.0 for i in chunk], batch_size))
    mu, sigma = fid_lib.gaussian_stats(distributed.gather_rows(local, len(paths), (FEATURE_DIM,), np.float64))
    if jax.process_index() == 0:
      fid_lib.save_fid_stats(mu, sigma, os.path.join(out_dir, "generated_stats.npz"))
    if reference_stats:
      out["fid"] = fid_lib.fid_from_stats(reference_stats, (mu, sigma))
      out["fid_reference"] = absolute_path(reference_stats)
  if clip_dir:
    from lmfusion_jax.checkpoints.clip import load_clip
    from lmfusion_jax.evaluation.metrics import clip_score as clip_lib
    clip = load_clip(clip_dir)
    local = over_my_images("eval clip score", lambda chunk: [float(v) for v in clip_lib.clip_score(
        clip, [_read_png(paths[i]) for i in chunk], [captions[i] for i in chunk], batch_size=batch_size)[1]])
    every = distributed.gather_json(local)
    # torchmetrics' CLIPScore: max(mean over pairs of 100 cos, 0)
    out["clip_score"] = max(float(np.mean([every[i] for i in range(len(paths))])), 0.0)
  return out


def run_prompt_eval(s: EvalSetup, prompts_file: str, out_dir: str, num_images: Optional[int] = None,
                    reference_stats: Optional[str] = None, inception_dir: Optional[str] = None,
                    clip_dir: Optional[str] = None) -> dict:
  """Images for the prompts of `prompts_file` under OUT, and their metrics (see the module docstring)."""
  from lmfusion_jax.evaluation.metrics import fid as fid_lib
  prompts = read_prompts(prompts_file)
  n = len(prompts) if num_images is None else int(num_images)
  if n < 1:
    raise UserError(f"--num-images {n}: must be >= 1")
  if reference_stats:
    fid_lib.load_fid_stats(reference_stats)   # a wrong file is refused before any image is drawn
    if not inception_dir:
      raise UserError("--reference-stats needs --inception DIR (the network the statistics were computed with)")
  out_dir = absolute_path(out_dir)
  reused, drawn = generate_missing(s, prompts, n, out_dir)
  paths = [image_file(out_dir, i) for i in range(n)]
  captions = [prompts[i % len(prompts)] for i in range(n)]
  metrics = image_metrics(paths, captions, inception_dir, clip_dir, int(s.cfg.eval.batch_size), out_dir,
                          reference_stats)
  result = {"prompts": absolute_path(prompts_file), "num_images": n, "images_reused": reused,
            "images_drawn": drawn, **_sampling_settings(s), **metrics,
            "processes": jax.process_count(), "devices": len(jax.devices())}
  if jax.process_index() == 0:
    write_text(os.path.join(out_dir, "images.jsonl"),
               "".join(json.dumps({"index": i, "file": os.path.relpath(paths[i], out_dir), "prompt": captions[i]})
                       + "\n" for i in range(n)))
    sheet = np.stack([_read_png(p) for p in paths[:SHEET_IMAGES]])
    write_png(os.path.join(out_dir, "contact_sheet.png"), contact_sheet(sheet))
    write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_text(os.path.join(out_dir, "report.md"), report(result, captions[:SHEET_IMAGES]))
  return result


def report(result: dict, first_prompts: list[str]) -> str:
  rows = "\n".join(f"| {k} | {result[k]} |" for k in sorted(result))
  prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(first_prompts[:16]))
  return (f"# Image generation from {os.path.basename(result['prompts'])}\n\n| field | value |\n|---|---|\n{rows}\n\n"
          f"![the first images](contact_sheet.png)\n\nThe first prompts, row by row:\n\n{prompts}\n")
