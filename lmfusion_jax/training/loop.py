"""The training loop: `lmfusion-jax train --config CFG [--config.k=v ...]`.

Order of state sources: the workdir's latest checkpoint (auto-resume) > `init_from` (a params checkpoint
written by `convert-llama`: text + image copies) > fresh random init. Checkpoints are saved asynchronously
every `save_every` steps (last `keep_checkpoints` kept), at the end, and on SIGTERM. A non-finite loss stops
the run with a message and exit code 3; the last good checkpoint stays.
"""
from __future__ import annotations

import dataclasses
import json
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
from lmfusion_jax.training import online_encoding
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts
from lmfusion_jax.data import batch as batch_lib
from lmfusion_jax.data.batch import global_batch as data_global_batch
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


def _check_finite(metrics: dict, step: int):
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise NonFiniteLossError(f"non-finite loss {loss} at step {step} (text_loss={float(metrics['text_loss'])}, "
                             f"image_loss={float(metrics['image_loss'])}); stopping, the last good "
                             f"checkpoint is kept")


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg, tokenizer=None) -> dict:
  """Runs training as configured; returns the final host metrics. Usable from Python and the CLI.

  Order: settle the config (setup.resolve_run_config) -> tokenizer -> take the workdir lock and check it is
  writable -> refuse an incompatible resume -> restore (falling back past damaged steps) or init -> only
  then write run_config.json, the tokenizer copy and the trimmed metrics.jsonl -> compile -> steps. A
  SIGTERM/SIGINT at any moment stops after the current step: that step is saved, the save awaited, then
  the message printed (every process agrees on the step; training.preemption)."""
  from lmfusion_jax.training import setup, workdir as workdir_lib
  from lmfusion_jax.training.preemption import StopRequest
  distributed.initialize(cfg.distributed)
  with StopRequest() as stop:
    setup.resolve_run_config(cfg, log)
    # Pure checks first: a config, tokenizer or resume that cannot work fails before anything is written.
    lcfg, fcfg, dcfg = model_configs(cfg)
    if tokenizer is None:
      from lmfusion_jax.data.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
    lcfg, fcfg = resolve_special_ids(cfg, lcfg, fcfg, tokenizer)
    mesh = sharding.mesh_from_config(cfg.mesh)
    setup.check_start(cfg, lcfg, fcfg, mesh)
    lock = workdir_lib.WorkdirLock(cfg.workdir, cfg.get("lock_stale_after_s", 600.0), warn=log)
    setup.on_process_0(lambda: (workdir_lib.check_writable(epath.Path(cfg.workdir) / ckpt_lib.CHECKPOINTS_DIR),
                                lock.acquire()))
    try:
      return _train_locked(cfg, (lcfg, fcfg, dcfg), tokenizer, mesh, stop, lock)
    finally:
      lock.release()


def _train_locked(cfg, configs, tokenizer, mesh, stop, lock) -> dict:
  from lmfusion_jax.training import setup, workdir as workdir_lib
  workdir = epath.Path(cfg.workdir)
  lcfg, fcfg, dcfg = configs
  from lmfusion_jax.data.pipeline import encodes_online
  enc, enc_params = online_encoding.load(cfg.data, mesh) if encodes_online(cfg.data) else (None, None)
  if enc is not None and not cfg.data.builder_config:   # before anything is written; the batch is checked too
    online_encoding.check_latent_shape(enc, int(cfg.data.image_size), fcfg, cfg.data.vae_dir)
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(cfg.optim), int(cfg.optim.accum_steps), enc)
  tx = optim.make_optimizer(cfg.optim, cfg.total_steps)
  lr_fns = optim.schedules(cfg.optim, cfg.total_steps)
  data_iter, rows = make_data_iterator(cfg, tokenizer)

  checkpointer = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINTS_DIR, save_every=cfg.save_every,
                                       keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
  try:
    state, restored = setup.restore_or_init(cfg, checkpointer, ts.abstract_state(spec, tx, mesh), data_iter,
                                            lambda params: ts.new_state(spec, tx, params, cfg.seed, mesh),
                                            lcfg, fcfg, mesh, log)
    if jax.process_index() == 0:   # the run is accepted: now its records are written
      write_json(workdir / ckpt_lib.RUN_CONFIG, run_config_record(cfg, lcfg, fcfg, dcfg))
      workdir_lib.copy_tokenizer(cfg.data.tokenizer_dir, workdir)
      dropped = workdir_lib.trim_metrics(workdir, restored or 0)
      if dropped:
        log(f"metrics.jsonl: dropped {dropped} line(s) of steps after {restored or 0} (logged, not checkpointed)")
    return _run_steps(cfg, spec, tx, lr_fns, mesh, state, data_iter, rows, checkpointer, stop, lock,
                      () if enc is None else (enc_params,))
  finally:
    checkpointer.close()


def _run_steps(cfg, spec, tx, lr_fns, mesh, state, data_iter, rows, checkpointer, stop, lock,
               frozen_args=()) -> dict:
  """The steps; `frozen_args` are the step's arguments after (state, batch): the VAE encoder parameters when
  encoding online."""
  lcfg, fcfg = spec.lcfg, spec.fcfg
  workdir = epath.Path(cfg.workdir)
  first_host = next(data_iter)
  batch_lib.check_batch(first_host, cfg.data.text_len, cfg.data.image_slots)
  want = (fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels)
  if spec.online is not None:
    online_encoding.check_latent_shape(spec.online, first_host["pixels"].shape[2], fcfg, cfg.data.vae_dir)
  elif cfg.data.image_slots and tuple(first_host["latents"].shape[2:]) != want:
    raise ConfigError(f"data ({cfg.data.dataset} in {cfg.data.data_dir}) has latents of shape "
                      f"{tuple(first_host['latents'].shape[2:])}, the model expects {want} (fusion.latent_size, "
                      f"fusion.latent_channels{' from init_from' if cfg.model.get('preset') == 'init' else ''})")
  first = global_batch(first_host, mesh, rows)
  step_fn = ts.jit_train_step(spec, tx, mesh, first, lr_fns)
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, first, *frozen_args).compile()
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
  step = start = int(state["step"])
  host_metrics = {}
  tokens_per_step = cfg.data.global_batch_size * (cfg.data.text_len + cfg.data.image_slots *
                                                  fcfg.tokens_per_image)
  batch = first
  t_start = t_last = t_beat = time.perf_counter()
  steps_since = 0
  try:
    if stop.requested and jax.process_count() == 1:
      log(f"{stop.signal_name} before the first step: nothing new to save (latest checkpoint: "
          f"{checkpointer.latest_step()}), exiting")
      return {"step": step}
    while step < cfg.total_steps:
      if batch is None:
        batch = global_batch(next(data_iter), mesh, rows)
      state, metrics = compiled(state, batch, *frozen_args)
      batch = None
      step += 1
      steps_since += 1
      stop_now = stop.now(step)          # decided once per step: the save below and the exit agree
      save_now = stop_now or step == cfg.total_steps or step % cfg.save_every == 0
      if step % cfg.log_every == 0 or save_now:
        host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(host_metrics, step)
        now = time.perf_counter()
        dt = (now - t_last) / max(steps_since, 1)
        t_last, steps_since = now, 0
        host_metrics.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
        if peak:  # MFU only where the device peak is known (never a NaN in TensorBoard/metrics.jsonl)
          mfu = step_flops / dt / (peak * jax.device_count())
          host_metrics["mfu"] = mfu
        eta = (now - t_start) / (step - start) * (cfg.total_steps - step)
        log(f"step {step}/{cfg.total_steps} loss {host_metrics['loss']:.4f} text {host_metrics['text_loss']:.4f}"
            f" image {host_metrics['image_loss']:.4f} lr {host_metrics.get('lr_image', 0):.2e} "
            f"tok/s {host_metrics['tokens_per_s']:.0f} step {dt * 1e3:.0f} ms"
            + (f" mfu {mfu:.1%}" if peak else "") + f" ETA {_fmt_eta(eta)}")
        if writer is not None:
          for k, v in host_metrics.items():
            writer.add_scalar(k, v, step)
        if metrics_file is not None:
          with metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **host_metrics}) + "\n")
      if save_now:
        checkpointer.save(step, state, data_iter, force=True)
      if stop_now:
        checkpointer.wait()   # committed (renamed into place) before we say so
        if step not in checkpointer.all_steps():
          raise ckpt_lib.CheckpointError(f"{stop.signal_name}: the save of step {step} under "
                                         f"{checkpointer.directory} did not commit")
        log(f"{stop.signal_name}: saved step {step} to {checkpointer.directory}/{step}, exiting")
        break
      if jax.process_index() == 0 and time.perf_counter() - t_beat > 60:
        lock.heartbeat()
        t_beat = time.perf_counter()
  finally:
    if writer is not None:
      writer.close()
  host_metrics["step"] = step
  return host_metrics
