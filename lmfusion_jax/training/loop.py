"""The training loop: `lmfusion-jax train --config CFG [--config.k=v ...]`.

Order of state sources: the workdir's latest checkpoint (auto-resume) > `init_from` (a params checkpoint
written by `convert-llama`: text + image copies) > fresh random init. Checkpoints are saved asynchronously
every `save_every` steps (last `keep_checkpoints` kept), at the end, and on SIGTERM. A non-finite loss stops
the run with a message and exit code 3; the last good checkpoint stays.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Optional

import jax
import numpy as np
from etils import epath

from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax.checkpoints.files import write_json
from lmfusion_jax import sharding
from lmfusion_jax.training import distributed
from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts
from lmfusion_jax.data import batch as batch_lib
from lmfusion_jax.data.batch import global_batch as data_global_batch
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.run_config import model_configs


class NonFiniteLossError(RuntimeError):
  pass


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def resolve_special_ids(cfg, lcfg, fcfg, tokenizer):
  """BOS/EOS/BOI/EOI from the tokenizer where the config leaves them open (-1); checked otherwise."""
  from lmfusion_jax.data.tokenizer import special_ids
  sp = special_ids(tokenizer)
  if len(tokenizer) > lcfg.vocab_size:
    raise ConfigError(f"tokenizer {cfg.data.tokenizer_dir} has {len(tokenizer)} tokens > model.vocab_size="
                      f"{lcfg.vocab_size}")
  fcfg = fcfg.replace(boi_id=sp["boi"] if fcfg.boi_id < 0 else fcfg.boi_id,
                      eoi_id=sp["eoi"] if fcfg.eoi_id < 0 else fcfg.eoi_id)
  if (fcfg.boi_id, fcfg.eoi_id) != (sp["boi"], sp["eoi"]):
    raise ConfigError(f"fusion.boi_id/eoi_id = {fcfg.boi_id}/{fcfg.eoi_id} but the tokenizer's BOI/EOI are "
                      f"{sp['boi']}/{sp['eoi']}")
  lcfg = lcfg.replace(bos_id=sp["bos"], eos_id=sp["eos"])
  return lcfg, fcfg


def run_config_record(cfg, lcfg, fcfg, dcfg) -> dict:
  return {"config": cfg.to_dict(), "llama": dataclasses.asdict(lcfg), "fusion": dataclasses.asdict(fcfg),
          "diffusion": dataclasses.asdict(dcfg)}


def make_data_iterator(cfg, tokenizer):
  """Host-local batches. data.process_sharding = 'records' (each process reads its own records) or 'rows'
  (every process builds the same global batches and keeps its rows: identical batches for any host count)."""
  from lmfusion_jax.data.pipeline import make_train_iterator
  n, i = jax.process_count(), jax.process_index()
  mode = cfg.data.get("process_sharding", "records")
  if mode == "records":
    return make_train_iterator(cfg.data, tokenizer, process_index=i, process_count=n), None
  if mode == "rows":
    local = cfg.data.global_batch_size // n
    return make_train_iterator(cfg.data, tokenizer, process_index=0, process_count=1), slice(i * local,
                                                                                            (i + 1) * local)
  raise ConfigError(f"data.process_sharding={mode!r}: expected 'records' or 'rows'")


def global_batch(host_batch: dict, mesh, rows: Optional[slice]) -> dict:
  """Global arrays from this process's batch (or, with rows, from its rows of a replicated global batch)."""
  if rows is not None:
    host_batch = {k: v[rows] for k, v in host_batch.items()}
  return data_global_batch(host_batch, mesh)


class _Preemption:
  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def load_init_params(path, lcfg, fcfg, mesh, seed: int) -> dict:
  """Params from a `convert-llama` checkpoint, checked against the run's architecture. A checkpoint without
  an `image` branch (or with one of another separation mode) gets a fresh image branch from its text."""
  from lmfusion_jax.checkpoints import params as params_io
  from lmfusion_jax.models.fusion import init_image_params
  ck_l, ck_f = params_io.read_model_config(path)
  arch = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")
  diff = [f for f in arch if getattr(ck_l, f) != getattr(lcfg, f)]
  if diff:
    raise ConfigError(f"init_from={path}: model field(s) {diff} differ from the run config "
                      f"({', '.join(f'{f}: {getattr(ck_l, f)} vs {getattr(lcfg, f)}' for f in diff)})")
  shardings = sharded.model_shardings(lcfg, fcfg, mesh)
  structural = ("separation", "image_io", "latent_size", "latent_channels", "patch_size", "unet_channels",
                "unet_blocks", "unet_groups", "time_embed_dim")
  same_image = fcfg.image_init == "copy" and ck_f is not None and all(getattr(ck_f, f) == getattr(fcfg, f) for f in structural)
  if same_image:
    return params_io.load_params(path, mesh=mesh, shardings=shardings)
  text = params_io.load_params(path, mesh=mesh, shardings=shardings["text"], subtree="text")
  with jax.set_mesh(mesh):
    image = jax.jit(lambda t: init_image_params(lcfg, fcfg, t, seed), out_shardings=shardings["image"])(text)
  return {"text": text, "image": image}


def _check_finite(metrics: dict, step: int):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise NonFiniteLossError(f"non-finite loss {loss} at step {step} (text_loss={float(metrics['text_loss'])}, "
                             f"image_loss={float(metrics['image_loss'])}); stopping, the last good "
                             f"checkpoint is kept")


def train(cfg, tokenizer=None) -> dict:
  """Runs training as configured; returns the final host metrics. Usable from Python and the CLI."""
  distributed.initialize(cfg.distributed)
  if not cfg.workdir:
    raise ConfigError("workdir is empty: set --config.workdir=DIR")
  workdir = epath.Path(cfg.workdir)
  lcfg, fcfg, dcfg = model_configs(cfg)
  if tokenizer is None:
    from lmfusion_jax.data.tokenizer import load_tokenizer
    if not cfg.data.tokenizer_dir:
      raise ConfigError("data.tokenizer_dir is empty: set --config.data.tokenizer_dir=DIR")
    tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
  lcfg, fcfg = resolve_special_ids(cfg, lcfg, fcfg, tokenizer)
  mesh = sharding.mesh_from_config(cfg.mesh)
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(cfg.optim), int(cfg.optim.accum_steps))
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps)
  lr_fns = optim.schedules(cfg.optim, cfg.total_steps)
  data_iter, rows = make_data_iterator(cfg, tokenizer)

  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / ckpt_lib.RUN_CONFIG, run_config_record(cfg, lcfg, fcfg, dcfg))
  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINTS_DIR, save_every=cfg.save_every,
                                       keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, ts.abstract_state(spec, tx, mesh), data_iter)
    log(f"resumed from {workdir}/checkpoints/{latest}")
  else:
    if cfg.init_from:
      params = load_init_params(cfg.init_from, lcfg, fcfg, mesh, cfg.seed)
      log(f"initialized from {cfg.init_from}")
    else:
      _, params = sharded.init_sharded(lcfg, fcfg, mesh, seed=cfg.seed)
      log("initialized from scratch")
    state = ts.new_state(spec, tx, params, cfg.seed, mesh)

  first_host = next(data_iter)
  batch_lib.check_batch(first_host, cfg.data.text_len, cfg.data.image_slots)
  first = global_batch(first_host, mesh, rows)
  step_fn = ts.jit_train_step(spec, tx, mesh, first, lr_fns)
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, first).compile()
  mem = compiled.memory_analysis()
  step_flops = flops_lib.train_step_flops(lcfg, fcfg, cfg.data.global_batch_size, cfg.data.text_len,
                                          cfg.data.image_slots, "text" in spec.trainable)["total"]
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.peak_flops_per_device)
  if mem is not None:
    log(f"compiled train step: {getattr(mem, 'temp_size_in_bytes', 0) / 2**20:.1f} MiB temp per device, "
        f"{step_flops / 1e9:.3f} GFLOP per step (analytic)")

  writer = None
  if cfg.tensorboard and jax.process_index() == 0:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(str(workdir / "tb"))

  metrics_file = workdir / "metrics.jsonl" if jax.process_index() == 0 else None
  step = int(state["step"])
  host_metrics = {}
  tokens_per_step = cfg.data.global_batch_size * (cfg.data.text_len + cfg.data.image_slots *
                                                  fcfg.tokens_per_image)
  batch = first
  t_last, steps_since = time.perf_counter(), 0
  with _Preemption() as preempt:
    try:
      while step < cfg.total_steps:
        if batch is None:
          batch = global_batch(next(data_iter), mesh, rows)
        state, metrics = compiled(state, batch)
        batch = None
        step += 1
        steps_since += 1
        last = step == cfg.total_steps
        will_save = last or preempt.requested or step % cfg.save_every == 0
        if step % cfg.log_every == 0 or will_save:
          host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(host_metrics, step)
          dt = (time.perf_counter() - t_last) / max(steps_since, 1)
          t_last, steps_since = time.perf_counter(), 0
          host_metrics.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
          if peak:  # MFU only where the device peak is known (never a NaN in TensorBoard/metrics.jsonl)
            mfu = step_flops / dt / (peak * jax.device_count())
            host_metrics["mfu"] = mfu
          log(f"step {step}/{cfg.total_steps} loss {host_metrics['loss']:.4f} text {host_metrics['text_loss']:.4f}"
              f" image {host_metrics['image_loss']:.4f} lr {host_metrics.get('lr_image', 0):.2e} "
              f"tok/s {host_metrics['tokens_per_s']:.0f} step {dt * 1e3:.0f} ms"
              + (f" mfu {mfu:.1%}" if peak else ""))
          if writer is not None:
            for k, v in host_metrics.items():
              writer.add_scalar(k, v, step)
          if metrics_file is not None:
            with metrics_file.open("a") as f:
              f.write(json.dumps({"step": step, **host_metrics}) + "\n")
        if will_save:
          checkpointer.save(step, state, data_iter, force=True)
        if preempt.requested:
          log(f"SIGTERM: saved step {step}, exiting")
          break
    finally:
      checkpointer.close()
      if writer is not None:
        writer.close()
  host_metrics["step"] = step
  return host_metrics
