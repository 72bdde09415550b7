"""eps-MSE of held-out caption-first pairs at fixed timesteps (eval.timesteps), noise drawn from
eval.noise_seed: a deterministic held-out loss for comparing checkpoints."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmfusion_jax.data.batch import global_batch
from lmfusion_jax.data.packing import empty_row, pack_documents
from lmfusion_jax.data.sequences import layout_document
from lmfusion_jax.evaluation import distributed
from lmfusion_jax.evaluation.setup import EvalSetup, batch_rows, stack_batches
from lmfusion_jax.inference.sampler import latent_shape
from lmfusion_jax.progress import Progress
from lmfusion_jax.training import step as ts


def diffusion_losses(params, spec: ts.StepSpec, batches: list, timesteps: Sequence[int], noise_seed: int,
                     mesh, progress_desc: str = "") -> dict:
  """{t: mean eps-MSE over the valid images of `batches` at timestep t}; noise from (noise_seed, batch).
  Batches done (over all timesteps) are reported under `progress_desc` when given."""
  step = jax.jit(ts.make_eval_step(spec))
  out = {}
  mine = distributed.share(range(len(batches)))   # several processes: each takes every P-th batch
  local = {}
  with jax.set_mesh(mesh), Progress(len(mine) * len(timesteps), progress_desc, "batch",
                                    enabled=None if progress_desc else False) as progress:
    for i in mine:
      b = global_batch(batches[i], mesh)
      for t in timesteps:
        tt = jnp.full(b["image_segment_ids"].shape, t, jnp.int32)
        m = step(params, b, jax.random.fold_in(jax.random.key(noise_seed), i), tt)
        local[f"{i}/{int(t)}"] = [float(m["image_loss"]) * float(m["images"]), float(m["images"])]
        progress.update(1, t=int(t))
  every = distributed.gather_json(local)
  for t in timesteps:   # summed in batch order: the same number on any process count
    total = sum(every[f"{i}/{int(t)}"][0] for i in range(len(batches)))
    count = sum(every[f"{i}/{int(t)}"][1] for i in range(len(batches)))
    out[int(t)] = total / max(count, 1.0)
  return out


class DiffusionLoss:
  """Evaluator `diffusion_loss`: diffusion_loss_t{t} for each t, and diffusion_loss_mean."""
  name = "diffusion_loss"

  def run(self, s: EvalSetup) -> dict:
    lm, data = s.loaded, s.cfg.data
    shape = latent_shape(lm.fusion)
    docs = [layout_document(r["id"], ids, r["latent"], caption_first=True, special=s.special,
                            tokens_per_image=lm.fusion.tokens_per_image) for r, ids in zip(s.records, s.caption_ids)]
    packed = list(pack_documents(docs, int(data.text_len), int(data.image_slots), shape))
    batches = stack_batches(packed, batch_rows(data, lm.mesh), empty_row(int(data.text_len), int(data.image_slots),
                                                                          shape))
    spec = ts.StepSpec(lm.llama, lm.fusion, lm.diffusion, ("image",), 1)
    timesteps = sorted({min(int(t), lm.diffusion.num_timesteps - 1) for t in s.cfg.eval.timesteps})
    losses = diffusion_losses(lm.params, spec, batches, timesteps, int(s.cfg.eval.noise_seed), lm.mesh,
                              "eval diffusion_loss")
    out = {f"diffusion_loss_t{t}": v for t, v in losses.items()}
    out["diffusion_loss_mean"] = float(np.mean(list(losses.values())))
    return out
