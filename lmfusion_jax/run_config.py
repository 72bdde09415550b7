"""The run config (ml_collections) every job reads, with defaults; configs/*.py start from `base_config()`.

Top-level fields:
  workdir, total_steps, seed, init_from, log_every, save_every, keep_checkpoints, async_checkpointing,
  eval_every, tensorboard, peak_flops_per_device (0 = look up the device kind)
Sections: model (LlamaConfig fields + `preset`/`hf_config`), fusion (FusionConfig fields), diffusion
(DiffusionConfig fields), optim, mesh, data (see lmfusion_jax.data.pipeline.default_data_config),
distributed.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models.config import (ConfigError, FusionConfig, LlamaConfig, fusion_config_from,
                                        llama_config_from)


def base_config() -> ml_collections.ConfigDict:
  from lmfusion_jax.data.pipeline import default_data_config
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.total_steps = 1000
  c.seed = 0
  c.init_from = ""            # a params checkpoint from `convert-llama` (text + image copies)
  c.log_every = 10
  c.save_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.eval_every = 0
  c.tensorboard = True
  c.peak_flops_per_device = 0.0
  c.model = ml_collections.ConfigDict({"preset": "llama3_8b"})
  c.fusion = ml_collections.ConfigDict(dataclasses.asdict(FusionConfig()))
  c.fusion.unet_channels = tuple(c.fusion.unet_channels)
  c.diffusion = ml_collections.ConfigDict({k: v for k, v in dataclasses.asdict(DiffusionConfig()).items()})
  c.optim = ml_collections.ConfigDict(dict(
      text_lr=0.0, image_lr=1e-4, text_final_lr=0.0, image_final_lr=1.5e-5, warmup_steps=4000,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, accum_steps=1))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.data = default_data_config()
  # records: each process reads its own records; rows: every process builds the same global batches and
  # keeps its rows (identical batches for any process count; costs host CPU).
  c.data.process_sharding = "records"
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                                 local_device_ids=""))
  return c


def model_configs(cfg) -> tuple[LlamaConfig, FusionConfig, DiffusionConfig]:
  """Frozen dataclasses from the run config (errors name the config field)."""
  lcfg = llama_config_from(cfg.model)
  fcfg = fusion_config_from(cfg.fusion)
  d = cfg.diffusion.to_dict()
  fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ConfigError(f"diffusion: unknown field(s) {sorted(unknown)}")
  dcfg = DiffusionConfig(**d)
  if cfg.data.tokens_per_image != fcfg.tokens_per_image:
    raise ConfigError(f"data.tokens_per_image={cfg.data.tokens_per_image} but the fusion config gives "
                      f"{fcfg.tokens_per_image} tokens per image ((latent_size / patch_size)^2)")
  return lcfg, fcfg, dcfg
