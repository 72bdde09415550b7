"""What every evaluator works from, built once per evaluation: the checkpoint's model on the mesh, the run
config with its `eval` section, the tokenizer, and the first `eval.num_examples` records of the eval split.

  default_eval_config()                 the `eval` section's fields and defaults
  resolve_config(loaded, config, overrides)
  prepare(checkpoint, config, overrides, mesh, step) -> EvalSetup
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from lmfusion_jax.checkpoints.vae import load_vae
from lmfusion_jax.data.batch import padded_chunks
from lmfusion_jax.data.sequences import as_text, record_id_of
from lmfusion_jax.inference import loading
from lmfusion_jax.inference.sampler import latent_shape
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.run_config import apply_overrides, load_config

# The metric families, in the order they run (eval.evaluators picks a subset).
EVALUATORS = ("text_nll", "diffusion_loss", "captioning", "generation")


def default_eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      evaluators=EVALUATORS,      # which metric families to run (lmfusion_jax.evaluation.evaluate.EVALUATORS)
      num_examples=64,            # first N records of data.eval_split: text NLL, diffusion loss, captioning, FID
      timesteps=(100, 500, 900),  # diffusion loss at these t (clipped to num_timesteps - 1)
      noise_seed=0,
      caption_max_new_tokens=24,
      batch_size=32,              # rows per captioning / sampling batch
      samples_per_class=10,       # labelled datasets: generated images per class
      num_generated=64,           # unlabelled datasets: generated images (prompts = eval captions)
      # "" / -1: the run's `sampling` section (what `sample` uses by default; run_config.sampling_defaults)
      sampling_steps=-1,
      sampler="",
      cfg_scale=-1.0,
      eta=-1.0,
      clip_x0=-1.0,               # < 0: auto (1.0 for pixel datasets, off with a VAE); 0: off
      seed=0,
      vae_dir="",                 # Flax VAE folder (save_vae) for latent datasets; "" = pixel-space latents
      fid=True,
  ))


def with_eval_section(cfg) -> ml_collections.ConfigDict:
  """cfg with an `eval` section (defaults filled in for missing fields)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  ev = default_eval_config()
  if "eval" in cfg:
    with ev.ignore_type():
      for k, v in cfg.eval.items():
        ev[k] = v
  cfg.eval = ev
  return cfg


def resolve_config(loaded: loading.LoadedModel, config=None, overrides: Sequence[str] = (),
                   need_data: bool = True):
  """The run config to evaluate with: `config` (ConfigDict or path[:arg]) or the run's recorded one,
  plus an `eval` section, plus overrides."""
  if config is None:
    if loaded.run_config is None:
      if not need_data:   # prompt / image-folder evaluation: the base config's sampling (the paper's) will do
        from lmfusion_jax.run_config import base_config
        cfg = base_config()
      else:
        raise ConfigError("evaluate: a params checkpoint records no data config; pass --config CFG")
    else:
      cfg = ml_collections.ConfigDict(loaded.run_config)
  elif isinstance(config, str):
    cfg = load_config(config)
  else:
    cfg = config
  cfg = apply_overrides(with_eval_section(cfg), overrides)
  fill_sampling(cfg, loaded.run_config)
  return cfg


def fill_sampling(cfg, run_config=None) -> None:
  """eval.sampler / sampling_steps / cfg_scale / eta left open ("" / -1) take the run's sampling defaults:
  those of the evaluated run (its run_config.json), else of `cfg` itself, else base_config()'s."""
  from lmfusion_jax.run_config import sampling_defaults
  base = sampling_defaults(run_config if run_config is not None else cfg.to_dict())
  ev = cfg.eval
  with ev.ignore_type():
    if not ev.sampler:
      ev.sampler = base["sampler"]
    for field, key in (("sampling_steps", "steps"), ("cfg_scale", "cfg_scale"), ("eta", "eta")):
      if ev[field] < 0:
        ev[field] = type(ev[field])(base[key])


def read_records(data_cfg, split: str, limit: Optional[int] = None) -> list:
  """The first `limit` records of `split` (all when None), as dicts with caption str / latent / label?. Records
  holding images (`prepare-data --encode none`, trained with data.encode="online") get their latents here, with
  the training step's function (data.vae_dir's encoder, posterior mean; a center data.crop_size crop if set)."""
  from lmfusion_jax.data.pipeline import make_source
  source, _ = make_source(data_cfg, split)
  n = len(source) if limit is None or limit < 0 else min(int(limit), len(source))
  out = []
  for i in range(n):
    r = source[i]
    out.append({"id": record_id_of(r, i), "caption": as_text(r.get("caption", "")).strip(),
                "latent": np.asarray(r["latent"], np.float32) if "latent" in r else np.asarray(r["image"]),
                "label": int(r["label"]) if "label" in r else None})
  if not out:
    raise ConfigError(f"data.{split}: no records to evaluate")
  if out[0]["latent"].dtype == np.uint8:
    _encode_images(data_cfg, out)
  return out


def _encode_images(data_cfg, records: list, batch_size: int = 16) -> None:
  """records' uint8 images [S, S, 3] (in "latent") -> their latents, in place."""
  from lmfusion_jax.data.prepare.encode import Encoder
  if not data_cfg.get("vae_dir"):
    raise ConfigError("data.vae_dir is empty: the dataset holds images (prepare-data --encode none), which "
                      "evaluation encodes with the training run's VAE; set --config.data.vae_dir=DIR")
  s = records[0]["latent"].shape[0]
  crop = int(data_cfg.get("crop_size", 0) or 0) or s
  lo = (s - crop) // 2
  encoder = Encoder("vae", crop, str(data_cfg.vae_dir), batch_size)
  for start in range(0, len(records), encoder.batch_size):
    chunk = records[start:start + encoder.batch_size]
    pixels = np.stack([r["latent"][lo:lo + crop, lo:lo + crop] for r in chunk])   # [n, crop, crop, 3]
    for r, (_, example) in zip(chunk, encoder.encode([r["id"] for r in chunk], [""] * len(chunk), pixels)):
      if example is None:
        raise ConfigError(f"data.{data_cfg.get('split', '')}: record {r['id']!r}: the VAE gives a non-finite latent")
      r["latent"] = example["latent"]


def batch_rows(data_cfg, mesh) -> int:
  """Rows per eval batch: data.global_batch_size rounded up to a multiple of the mesh's batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return int(math.ceil(data_cfg.global_batch_size / shards) * shards)


def stack_batches(rows: list, rows_per_batch: int, empty: dict) -> list:
  """Rows -> batches of `rows_per_batch` (the last one filled with `empty` rows)."""
  return [{k: np.stack([r[k] for r in chunk]) for k in empty}
          for chunk, _ in padded_chunks(rows, rows_per_batch, empty, always_pad=True)]


@dataclasses.dataclass
class EvalSetup:
  loaded: loading.LoadedModel
  cfg: Any                   # the run config with its `eval` section
  tokenizer: Any
  special: dict              # special token ids (bos, eos, boi, eoi, pad)
  records: list              # eval records {"id", "caption", "latent", "label"}
  caption_ids: list          # each record's caption as token ids (no specials)
  vae: Any                   # Flax VAE for latent datasets, or None (pixel-space latents)
  clip_x0: Optional[float]

  @property
  def model(self):
    return self.loaded.model()

  def encode(self, text: str) -> list:
    from lmfusion_jax.data.tokenizer import CaptionEncoder
    return CaptionEncoder(self.tokenizer)(text)


def prepare(checkpoint, config=None, overrides: Sequence[str] = (), *, mesh=None,
            step: Optional[int] = None, with_records: bool = True, tokenizer_dir: Optional[str] = None) -> EvalSetup:
  """The model on `mesh` (default: this process's devices, evaluation.distributed), the config, the tokenizer
  (`tokenizer_dir`, else the checkpoint's, else data.tokenizer_dir) and, `with_records`, the eval records."""
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  from lmfusion_jax.evaluation.distributed import process_mesh
  loaded = loading.load_model(checkpoint, mesh=mesh if mesh is not None else process_mesh(), step=step)
  cfg = resolve_config(loaded, config, overrides, need_data=with_records)
  ev, data = cfg.eval, cfg.data
  if tokenizer_dir:
    data.tokenizer_dir = tokenizer_dir
  elif loaded.tokenizer_dir and (config is None or not data.tokenizer_dir):
    data.tokenizer_dir = loaded.tokenizer_dir   # the tokenizer that travels with the checkpoint
  if not data.tokenizer_dir:
    raise ConfigError("data.tokenizer_dir is empty: set --config.data.tokenizer_dir=DIR")
  tokenizer = load_tokenizer(data.tokenizer_dir)
  special = special_ids(tokenizer)
  fcfg = loaded.fusion
  if (special["boi"], special["eoi"]) != (fcfg.boi_id, fcfg.eoi_id):
    raise ConfigError(f"tokenizer {data.tokenizer_dir}: BOI/EOI = {special['boi']}/{special['eoi']} but the "
                      f"checkpoint's model uses {fcfg.boi_id}/{fcfg.eoi_id}")
  vae = load_vae(ev.vae_dir)[1] if ev.vae_dir else None
  clip_x0 = None if ev.clip_x0 == 0 else (float(ev.clip_x0) if ev.clip_x0 > 0 else (None if vae else 1.0))
  encode = CaptionEncoder(tokenizer)
  if not with_records:
    return EvalSetup(loaded, cfg, tokenizer, special, [], [], vae, clip_x0)
  records = read_records(data, data.eval_split, ev.num_examples)
  shape = latent_shape(fcfg)
  bad = [r["id"] for r in records if tuple(r["latent"].shape) != shape]
  if bad:
    raise ConfigError(f"data.{data.eval_split}: record id={bad[0]!r} has a latent of shape "
                      f"{records[0]['latent'].shape}, the model expects {shape}")
  return EvalSetup(loaded, cfg, tokenizer, special, records, [encode(r["caption"]) for r in records], vae,
                   clip_x0)
