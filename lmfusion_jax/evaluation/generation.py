"""Images generated from the dataset's prompts (eval.sampler / sampling_steps / cfg_scale): for labelled data
the share an independent classifier, fitted on the REAL training images, assigns to the prompted class; and a
Frechet distance of generated vs real eval images in a feature space (the `feature_fn` given to `evaluate`,
else the classifier's logits; null when neither exists; not Inception FID unless given Inception features)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from lmfusion_jax.data import eval_sets
from lmfusion_jax.data.batch import padded_chunks
from lmfusion_jax.evaluation import metrics
from lmfusion_jax.evaluation import distributed
from lmfusion_jax.evaluation.setup import EvalSetup, read_records
from lmfusion_jax.inference.image import generate_images
from lmfusion_jax.inference.image_files import to_float_images
from lmfusion_jax.inference.sampler import latent_shape
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.progress import Progress


def sample_batched(model, prompt_ids: list, image_ids: list, dcfg, ev, clip_x0, pad_id: int,
                   desc: str = "eval generation", on_batch=None) -> np.ndarray:
  """Latents [N, H, W, C] for every prompt, in batches of eval.batch_size (last batch padded: one compilation).
  Image n's noise comes from (eval.seed, image_ids[n]) alone, so it does not depend on its batch or process.
  `on_batch(ids, latents)` is called after each batch (e.g. to write its images)."""
  out = []
  bs = int(ev.batch_size)
  with Progress(len(prompt_ids), desc, unit="image") as progress:
    for start, (chunk, real) in zip(range(0, len(prompt_ids), bs), padded_chunks(prompt_ids, bs)):
      ids = list(image_ids[start:start + real])
      lat = generate_images(model, chunk, dcfg, num_steps=int(ev.sampling_steps), sampler=ev.sampler,
                            cfg_scale=float(ev.cfg_scale), seed=int(ev.seed), eta=float(ev.eta),
                            clip_x0=clip_x0, pad_id=pad_id, image_ids=ids + [0] * (len(chunk) - real))
      lat = np.asarray(lat)[:real]
      if on_batch is not None:
        on_batch(ids, lat)
      out.append(lat)
      progress.update(real)
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


class Generation:
  """Evaluator `generation`: num_generated, generation_accuracy (labelled data), fid."""
  name = "generation"

  def __init__(self, feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    self.feature_fn = feature_fn

  def run(self, s: EvalSetup) -> dict:
    ev, data = s.cfg.eval, s.cfg.data
    prompts, labels = eval_sets.generation_prompts(data.dataset, s.records, int(ev.samples_per_class),
                                                   int(ev.num_generated))
    mine = distributed.share(range(len(prompts)))   # several processes: each samples every P-th prompt
    local = sample_batched(s.model, [s.encode(prompts[i]) for i in mine], mine, s.loaded.diffusion, ev, s.clip_x0,
                           s.special["pad"])
    latents = distributed.gather_rows(dict(zip(mine, local)), len(prompts), latent_shape(s.loaded.fusion),
                                      np.float32)
    images = to_float_images(latents, s.vae)
    out = {"num_generated": len(prompts)}
    clf = None
    if labels is not None:
      train = read_records(data, data.split)
      if any(r["label"] is None for r in train):
        raise ConfigError(f"data.{data.split}: records without labels; cannot fit the image classifier")
      clf = metrics.fit_digit_classifier(to_float_images(np.stack([r["latent"] for r in train]), s.vae),
                                         [r["label"] for r in train], **eval_sets.classifier_spec(data.dataset))
      out["generation_accuracy"] = metrics.generation_accuracy(clf, images, labels)
    feature_fn = self.feature_fn or (metrics.digit_feature_fn(clf) if clf is not None else None)
    out["fid"] = None
    if ev.fid and feature_fn is not None:
      real = to_float_images(np.stack([r["latent"] for r in s.records]), s.vae)
      out["fid"] = metrics.fid_from_images(real, images, feature_fn)
    return out
