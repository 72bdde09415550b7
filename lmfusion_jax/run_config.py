"""The run config (ml_collections) every job reads: defaults (`base_config()`, what configs/*.py start from),
loading `get_config(arg)` files, `--config.a.b=value` overrides, and the model dataclasses built from it.

Top-level fields:
  workdir, total_steps, seed, init_from, log_every, save_every, keep_checkpoints, async_checkpointing,
  eval_every, tensorboard, peak_flops_per_device (0 = look up the device kind), reinit_image,
  lock_stale_after_s
Sections: model (LlamaConfig fields + `preset`/`hf_config`; preset "init" = init_from's architecture),
fusion (FusionConfig fields), diffusion (DiffusionConfig fields), sampling (the run's default sampler,
steps, cfg_scale, eta), optim, mesh, data (see lmfusion_jax.data.pipeline.default_data_config),
distributed.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib

import ml_collections

from lmfusion_jax.diffusion import DiffusionConfig
from lmfusion_jax.models.config import (ConfigError, FusionConfig, LlamaConfig, check_float, check_int,
                                        fusion_config_from, llama_config_from)
from lmfusion_jax.errors import UserError


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
  c.reinit_image = False      # build a fresh image branch instead of loading init_from's (another U-Net/io)
  c.lock_stale_after_s = 600.0  # a workdir lock from another host not refreshed for this long is stale
  # How this run's images are sampled by default (`sample`, `eval`, the demo; flags and eval.* override).
  c.sampling = ml_collections.ConfigDict(dict(sampler="ddpm", steps=250, cfg_scale=1.55, eta=0.0))
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


def sampling_defaults(run_config=None) -> dict:
  """{sampler, steps, cfg_scale, eta}: a run's recorded `sampling` section (a run_config.json `config`
  dict or a ConfigDict), filled from base_config() for runs recorded without one."""
  out = base_config().sampling.to_dict()
  section = (run_config or {}).get("sampling") if run_config is not None else None
  if section:
    out.update({k: v for k, v in dict(section).items() if k in out})
  return out


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


_MISSING = object()


def _field(cfg, key: str):
  node = cfg
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      node = _MISSING
    if node is _MISSING:
      raise ConfigError(f"{key}: missing field (every run config starts from run_config.base_config())")
  return node


def validate_run_config(cfg) -> None:
  """Checks the training-level fields of a run config; raises ConfigError naming the first bad field.

  Steps and counts are integers (a bool is not): total_steps, save_every, log_every, keep_checkpoints,
  optim.accum_steps, data.global_batch_size, data.text_len >= 1; data.image_slots, optim.warmup_steps,
  eval_every >= 0; optim.accum_steps divides data.global_batch_size; learning rates are finite and >= 0.
  The mesh (and whether the batch splits over it) and the model fields are checked elsewhere
  (sharding.make_mesh, `model_configs`)."""
  for key in ("total_steps", "save_every", "log_every", "keep_checkpoints", "optim.accum_steps",
              "data.global_batch_size", "data.text_len"):
    check_int(key, _field(cfg, key), minimum=1)
  for key in ("data.image_slots", "optim.warmup_steps", "eval_every"):
    check_int(key, _field(cfg, key), minimum=0)
  for key in ("optim.text_lr", "optim.image_lr", "optim.text_final_lr", "optim.image_final_lr"):
    check_float(key, _field(cfg, key), minimum=0.0)
  batch, accum = _field(cfg, "data.global_batch_size"), _field(cfg, "optim.accum_steps")
  if batch % accum:
    raise ConfigError(f"optim.accum_steps={accum} does not divide data.global_batch_size={batch} "
                      f"(each step splits the batch into accum_steps equal micro-batches)")


# --- config files and command-line overrides -------------------------------------------------------
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigLoadError(UserError):
  pass


def resolve_config_path(name: str) -> pathlib.Path:
  """'configs/tiny.py', '/abs/x.py' or a bare preset name 'tiny' (looked up in the packaged configs/)."""
  p = pathlib.Path(name)
  if p.suffix == ".py" and p.exists():
    return p
  for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.py", CONFIG_DIR / p.name):
    if cand.exists() and cand.suffix == ".py":
      return cand
  raise ConfigLoadError(f"config file {name!r} not found (looked in . and {CONFIG_DIR})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = resolve_config_path(path)
  mod_spec = importlib.util.spec_from_file_location(f"lmfusion_config_{file.stem}", file)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigLoadError(f"{file}: defines no get_config(arg)")
  cfg = module.get_config(arg) if arg else module.get_config()
  return cfg


def _parse_value(text: str, current, key: str):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigLoadError(f"--config.{key}={text!r}: expected true/false")
  if isinstance(current, str):   # before the null check: "none" is a value of string choices (remat_policy, ...)
    return text
  if text.lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigLoadError(f"--config.{key}={text!r}: cannot parse as {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if current is not None and isinstance(current, (int, float)) and not isinstance(value, (int, float)):
    raise ConfigLoadError(f"--config.{key}={text!r}: expected a {type(current).__name__}")
  if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
    raise ConfigLoadError(f"--config.{key}={text!r}: expected an integer")
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies ['--config.a.b=v', 'a.b=v', ...]; unknown keys are errors (typos never pass silently)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict()) if not isinstance(cfg, ml_collections.ConfigDict) else cfg
  for item in overrides or ():
    s = item[2:] if item.startswith("--") else item
    if s.startswith("config."):
      s = s[len("config."):]
    if "=" not in s:
      raise ConfigLoadError(f"override {item!r}: expected --config.key=value")
    key, text = s.split("=", 1)
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if p not in node:
        raise ConfigLoadError(f"--config.{key}: unknown field {p!r}")
      node = node[p]
    leaf = parts[-1]
    if leaf not in node:
      raise ConfigLoadError(f"--config.{key}: unknown field (known here: {sorted(node.keys())})")
    with node.ignore_type():
      node[leaf] = _parse_value(text, node[leaf], key)
  return cfg
