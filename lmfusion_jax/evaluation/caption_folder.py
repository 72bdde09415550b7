"""Captioning a folder of images against reference captions (the paper's image-understanding number, CIDEr-D on
COCO captions):

  run_caption_eval(setup, images_dir, references_file, out_dir, on_bad_image)

References: a .jsonl file, one JSON object a line: {"file": PATH relative to the folder, "captions": [str, ...]}
("caption": str is accepted for one reference). Every image needs references and every reference an image.
Unreadable images stop the run naming the file (on_bad_image="error", the default) or are left out, named and
counted ("skip").

Written under OUT (each file atomically): captions/FIRST-LAST.jsonl per batch ({"file", "caption"}: a restarted
run reuses every caption already there), captions.jsonl (all, in file order), results.json and report.md.
Several processes: each captions the missing images i with i % P == p; the captions are read back after a
barrier. OUT (and the references file) may be local or gs://, and must be storage every process sees; the image
folder is read with the local file system (a copy on each host, or a shared mount).
"""
from __future__ import annotations

import json
import os

from etils import epath

import jax
import numpy as np

from lmfusion_jax.checkpoints.files import absolute_path, write_text
from lmfusion_jax.errors import UserError
from lmfusion_jax.evaluation import distributed, metrics
from lmfusion_jax.evaluation.jsonl_files import read_records
from lmfusion_jax.evaluation.metrics.inception import list_images
from lmfusion_jax.evaluation.setup import EvalSetup
from lmfusion_jax.inference.caption import caption_images
from lmfusion_jax.inference.image_files import latents_from_images, model_input_image
from lmfusion_jax.progress import Progress


class ReferencesError(UserError):
  """A references file that cannot be used (names the file and line, or the image)."""


def read_references(path) -> dict[str, list[str]]:
  """{relative file: [reference captions]} from a .jsonl file (see the module docstring)."""
  def parse(r):
    caps = (r.get("captions", [r["caption"]] if "caption" in r else None)) if isinstance(r, dict) else None
    ok = (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(caps, list) and caps
          and all(isinstance(c, str) and c.strip() for c in caps))
    return (os.path.normpath(r["file"]), [c.strip() for c in caps]) if ok else None
  refs: dict[str, list[str]] = {}
  for file, caps in read_records("--references", path, parse, '{"file": str, "captions": [non-empty str, ...]}',
                                 ReferencesError):
    refs.setdefault(file, []).extend(caps)
  return refs


def _done(out_dir: str) -> dict[str, str]:
  done = {}
  parts = epath.Path(out_dir) / "captions"
  for part in sorted(parts.glob("*.jsonl")) if parts.exists() else []:   # local or gs://
    for line in part.read_text(encoding="utf-8").splitlines():
      r = json.loads(line)
      done[r["file"]] = r["caption"]
  return done


def run_caption_eval(s: EvalSetup, images_dir: str, references_file: str, out_dir: str,
                     on_bad_image: str = "error") -> dict:
  """Greedy captions of every image under `images_dir`, CIDEr-D against the references (module docstring)."""
  folder, out_dir = absolute_path(images_dir), absolute_path(out_dir)
  files = [os.path.relpath(p, folder) for p in list_images(folder)]
  refs = read_references(references_file)
  no_refs = [f for f in files if f not in refs]
  if no_refs:
    raise ReferencesError(f"--references {references_file}: no references for image {no_refs[0]!r} "
                          f"({len(no_refs)} of {len(files)} images have none)")
  no_image = sorted(set(refs) - set(files))
  if no_image:
    raise ReferencesError(f"--references {references_file}: references for {no_image[0]!r}, which is not an image "
                          f"under {folder} ({len(no_image)} such entries)")
  done = _done(out_dir)
  distributed.barrier("caption eval: listed captions")
  missing = [f for f in files if f not in done]
  mine = distributed.share(missing)
  bs = int(s.cfg.eval.batch_size)
  position = {f: i for i, f in enumerate(files)}
  bad_local = {}
  with Progress(len(mine), "eval captions", unit="image") as progress:
    for start in range(0, len(mine), bs):
      chunk, images = [], []
      for f in mine[start:start + bs]:
        try:
          images.append(model_input_image(os.path.join(folder, f), s.loaded.fusion, s.vae))
          chunk.append(f)
        except UserError as e:
          if on_bad_image == "error":
            raise UserError(f"{e} (pass --on-bad-image skip to leave unreadable files out)") from e
          bad_local[f] = str(e)
      if chunk:
        caps = caption_images(s.model, s.tokenizer, latents_from_images(np.stack(images), s.vae), batch_size=bs,
                              max_new_tokens=int(s.cfg.eval.caption_max_new_tokens))
        name = f"{position[chunk[0]]:06d}-{position[chunk[-1]]:06d}.jsonl"
        write_text(os.path.join(out_dir, "captions", name),
                   "".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in zip(chunk, caps)))
      progress.update(len(mine[start:start + bs]))
  bad = distributed.gather_json(bad_local)
  distributed.barrier("caption eval: captions written")
  done = _done(out_dir)
  scored = [f for f in files if f in done]
  cider, per_image = metrics.cider_d({f: done[f] for f in scored}, {f: refs[f] for f in scored})
  result = {"images": absolute_path(images_dir), "references": absolute_path(references_file),
            "num_images": len(scored), "skipped_unreadable": len(bad),
            "captions_reused": len(files) - len(missing),
            "cider_d": cider, "processes": jax.process_count(), "devices": len(jax.devices())}
  for f, reason in sorted(bad.items()):
    print(f"eval: warning: skipped unreadable image: {reason}", flush=True)
  if jax.process_index() == 0:
    write_text(os.path.join(out_dir, "captions.jsonl"),
               "".join(json.dumps({"file": f, "caption": done[f], "cider_d": per_image[f]}) + "\n"
                       for f in scored))
    write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1, sort_keys=True) + "\n")
    rows = "\n".join(f"| {k} | {result[k]} |" for k in sorted(result))
    examples = "\n".join(f"| {f} | {done[f]} | {refs[f][0]} |" for f in scored[:10])
    write_text(os.path.join(out_dir, "report.md"),
               f"# Captions of {result['images']}\n\n| field | value |\n|---|---|\n{rows}\n\n"
               f"| image | caption | first reference |\n|---|---|---|\n{examples}\n")
  return result
