"""`evaluate(checkpoint, config, overrides)`: held-out metrics of a checkpoint, restored onto ANY mesh.

Everything is deterministic (fixed eval records, fixed noise seeds, greedy captions), so the same
checkpoint gives the same numbers on any device count / mesh (up to float reduction order).

  text_nll, text_perplexity   next-token NLL of the eval split's captions as plain text documents
                              `BOS caption EOS` (text-only forward; unchanged by LMFusion training when
                              the text is frozen)
  diffusion_loss_t{t}         eps-MSE on held-out caption-first pairs at fixed timesteps t (eval.timesteps),
  diffusion_loss_mean         noise drawn from eval.noise_seed; and their mean
  cider_d                     CIDEr-D of greedy captions (`BOS BOI image EOI` -> text) against references
                              (digits: every caption template of the true digit; else the record's caption)
  caption_accuracy            labelled datasets: captions naming exactly the true class (metrics.text)
  generation_accuracy         labelled datasets: generated images (prompts naming each class) that a
                              classifier fitted on the REAL training images assigns to the prompted class
  fid                         Frechet distance of generated vs real eval images in a feature space: the
                              `feature_fn` argument, else (labelled datasets) the classifier's logits;
                              null when neither exists. Not Inception FID unless you pass Inception features.

Sizes (`config.eval`, defaults in `default_eval_config()`, override with --config.eval.k=v) keep CI runs
small. Single-process (every host would evaluate the same records).
"""
from __future__ import annotations

import json
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lmfusion_jax.inference import caption as caption_lib
from lmfusion_jax.inference import image as generate_image
from lmfusion_jax.training import losses
from lmfusion_jax.evaluation import metrics
from lmfusion_jax.inference import loading as model_loading
from lmfusion_jax.training import step as ts
from lmfusion_jax.run_config import apply_overrides, load_config
from lmfusion_jax.data.batch import global_batch
from lmfusion_jax.data.packing import empty_row, pack_documents
from lmfusion_jax.data.sequences import as_text, layout_document, record_id_of
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import ConfigError


def default_eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_examples=64,            # first N records of data.eval_split: text NLL, diffusion loss, captioning, FID
      timesteps=(100, 500, 900),  # diffusion loss at these t (clipped to num_timesteps - 1)
      noise_seed=0,
      caption_max_new_tokens=24,
      batch_size=32,              # rows per captioning / sampling batch
      samples_per_class=10,       # labelled datasets: generated images per class
      num_generated=64,           # unlabelled datasets: generated images (prompts = eval captions)
      sampling_steps=50,
      sampler="ddim",
      cfg_scale=1.0,
      eta=0.0,
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


# ---------------------------------------------------------------------------------------------- records


def read_records(data_cfg, split: str, limit: Optional[int] = None) -> list:
  """The first `limit` records of `split` (all when None), as dicts with caption str / latent / label?."""
  from lmfusion_jax.data.pipeline import make_source
  source, _ = make_source(data_cfg, split)
  n = len(source) if limit is None or limit < 0 else min(int(limit), len(source))
  out = []
  for i in range(n):
    r = source[i]
    out.append({"id": record_id_of(r, i), "caption": as_text(r.get("caption", "")).strip(),
                "latent": np.asarray(r["latent"], np.float32),
                "label": int(r["label"]) if "label" in r else None})
  if not out:
    raise ConfigError(f"data.{split}: no records to evaluate")
  return out


def references_for(record: dict, dataset: str) -> list:
  if dataset == "digits" and record["label"] is not None:
    from lmfusion_jax.data.tfds_digits import TEMPLATES, WORDS
    return [t.format(word=WORDS[record["label"]], num=record["label"]) for t in TEMPLATES]
  return [record["caption"]]


def _batch_rows(data_cfg, mesh) -> int:
  """Rows per eval batch: data.global_batch_size rounded up to a multiple of the mesh's batch axes."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return int(math.ceil(data_cfg.global_batch_size / shards) * shards)


def _stack(rows: list, batch_rows: int, empty: dict) -> list:
  batches = []
  for start in range(0, len(rows), batch_rows):
    chunk = rows[start:start + batch_rows]
    chunk = chunk + [empty] * (batch_rows - len(chunk))
    batches.append({k: np.stack([r[k] for r in chunk]) for k in empty})
  return batches


# ---------------------------------------------------------------------------------------------- losses


def text_rows(caption_ids: Sequence[Sequence[int]], bos: int, eos: int, text_len: int) -> list:
  """`BOS caption EOS` as one text-only row each (tokens/positions/segments/targets/loss_mask [T])."""
  rows = []
  for ids in caption_ids:
    doc = [bos] + list(ids) + [eos]
    if len(doc) > text_len:
      raise ConfigError(f"a caption of {len(ids)} tokens does not fit data.text_len={text_len}")
    n = len(doc)
    row = {"tokens": np.zeros(text_len, np.int32), "text_positions": np.zeros(text_len, np.int32),
           "text_segment_ids": np.zeros(text_len, np.int32), "targets": np.zeros(text_len, np.int32),
           "loss_mask": np.zeros(text_len, np.float32)}
    row["tokens"][:n] = doc
    row["text_positions"][:n] = np.arange(n)
    row["text_segment_ids"][:n] = 1
    row["targets"][:n - 1] = doc[1:]
    row["loss_mask"][:n - 1] = 1.0
    rows.append(row)
  return rows


def text_nll(params, lcfg, fcfg, batches: list, mesh) -> tuple[float, int]:
  """(mean NLL per target token, number of target tokens) with a text-only forward."""
  graphdef, abstract = sharded.graphdef_and_abstract_state(lcfg, fcfg)
  shape = generate_image.latent_shape(fcfg)

  @jax.jit
  def nll(params, b):
    model = sharded.merge(graphdef, abstract, params)
    rows = b["tokens"].shape[0]
    z = jnp.zeros((rows, 0), jnp.int32)
    logits, _, _ = model(b["tokens"], b["text_positions"], b["text_segment_ids"],
                         jnp.zeros((rows, 0) + shape, jnp.float32), z, z, z)
    _, n, total = losses.lm_loss(logits, b["targets"], b["loss_mask"])
    return total, n

  total, count = 0.0, 0.0
  with jax.set_mesh(mesh):
    for b in batches:
      t, n = nll(params, global_batch(b, mesh))
      total, count = total + float(t), count + float(n)
  return total / max(count, 1.0), int(count)


def held_out_text_metrics(params, lcfg, fcfg, data_cfg, caption_ids, mesh) -> dict:
  """text_nll / text_perplexity / text_tokens of `BOS caption EOS` documents (text-only forward)."""
  t_rows = text_rows(caption_ids, lcfg.bos_id, lcfg.eos_id, int(data_cfg.text_len))
  t_batches = _stack(t_rows, _batch_rows(data_cfg, mesh), {k: np.zeros_like(v) for k, v in t_rows[0].items()})
  nll, n_tok = text_nll(params, lcfg, fcfg, t_batches, mesh)
  return {"text_nll": nll, "text_perplexity": math.exp(nll), "text_tokens": n_tok}


def diffusion_losses(params, spec: ts.StepSpec, batches: list, timesteps: Sequence[int], noise_seed: int,
                     mesh) -> dict:
  """{t: mean eps-MSE over the valid images of `batches` at timestep t}; noise from (noise_seed, batch)."""
  step = jax.jit(ts.make_eval_step(spec))
  out = {}
  with jax.set_mesh(mesh):
    gbatches = [global_batch(b, mesh) for b in batches]
    for t in timesteps:
      total, count = 0.0, 0.0
      for i, b in enumerate(gbatches):
        tt = jnp.full(b["image_segment_ids"].shape, t, jnp.int32)
        m = step(params, b, jax.random.fold_in(jax.random.key(noise_seed), i), tt)
        total += float(m["image_loss"]) * float(m["images"])
        count += float(m["images"])
      out[int(t)] = total / max(count, 1.0)
  return out


# ---------------------------------------------------------------------------------------------- generation


def generation_prompts(records: list, dataset: str, num_classes: int, samples_per_class: int,
                       num_generated: int) -> tuple[list, Optional[list]]:
  """(prompt texts, prompted labels or None). Digits: caption templates naming each digit (cycled)."""
  if dataset == "digits":
    from lmfusion_jax.data.tfds_digits import TEMPLATES, WORDS
    prompts, labels = [], []
    for c in range(num_classes):
      for k in range(samples_per_class):
        prompts.append(TEMPLATES[k % len(TEMPLATES)].format(word=WORDS[c], num=c))
        labels.append(c)
    return prompts, labels
  labelled = all(r["label"] is not None for r in records)
  if labelled:
    chosen = []
    for c in sorted({r["label"] for r in records}):
      members = [r for r in records if r["label"] == c]
      chosen += [members[k % len(members)] for k in range(samples_per_class)]
    return [r["caption"] for r in chosen], [r["label"] for r in chosen]
  chosen = [records[k % len(records)] for k in range(num_generated)]
  return [r["caption"] for r in chosen], None


def sample_batched(model, prompt_ids: list, dcfg, ev, clip_x0, pad_id: int) -> np.ndarray:
  """Latents for every prompt, in batches of eval.batch_size (last batch padded: one compilation)."""
  out = []
  bs = int(ev.batch_size)
  for start in range(0, len(prompt_ids), bs):
    chunk = prompt_ids[start:start + bs]
    real = len(chunk)
    if len(prompt_ids) > bs:
      chunk = chunk + [chunk[-1]] * (bs - real)
    lat = generate_image.generate_images(
        model, chunk, dcfg, num_steps=int(ev.sampling_steps), sampler=ev.sampler, cfg_scale=float(ev.cfg_scale),
        seed=int(ev.seed) + start, eta=float(ev.eta), clip_x0=clip_x0, pad_id=pad_id)
    out.append(np.asarray(lat)[:real])
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- main


def _load_vae(vae_dir: str):
  if not vae_dir:
    return None
  from lmfusion_jax.convert.diffusers_vae import load_vae
  return load_vae(vae_dir)[1]


def resolve_config(loaded: model_loading.LoadedModel, config=None, overrides: Sequence[str] = ()):
  """The run config to evaluate with: `config` (ConfigDict or path[:arg]) or the run's recorded one,
  plus an `eval` section, plus overrides."""
  if config is None:
    if loaded.run_config is None:
      raise ConfigError("evaluate: a params checkpoint records no data config; pass --config CFG")
    cfg = ml_collections.ConfigDict(loaded.run_config)
  elif isinstance(config, str):
    cfg = load_config(config)
  else:
    cfg = config
  return apply_overrides(with_eval_section(cfg), overrides)


def evaluate(checkpoint, config=None, overrides: Sequence[str] = (), *, mesh=None, step: Optional[int] = None,
             feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> dict:
  """Metrics of `checkpoint` (training workdir, step dir or params checkpoint) as a JSON-able dict."""
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  if jax.process_count() > 1:
    raise RuntimeError("evaluate runs in a single process (it would evaluate the same records on every host)")
  loaded = model_loading.load_model(checkpoint, mesh=mesh, step=step)
  lcfg, fcfg, dcfg, params, mesh = loaded.llama, loaded.fusion, loaded.diffusion, loaded.params, loaded.mesh
  cfg = resolve_config(loaded, config, overrides)
  ev, data = cfg.eval, cfg.data
  if not data.tokenizer_dir:
    raise ConfigError("data.tokenizer_dir is empty: set --config.data.tokenizer_dir=DIR")
  tokenizer = load_tokenizer(data.tokenizer_dir)
  encode = CaptionEncoder(tokenizer)
  special = special_ids(tokenizer)
  pad_id = special["pad"]
  if (special["boi"], special["eoi"]) != (fcfg.boi_id, fcfg.eoi_id):
    raise ConfigError(f"tokenizer {data.tokenizer_dir}: BOI/EOI = {special['boi']}/{special['eoi']} but the "
                      f"checkpoint's model uses {fcfg.boi_id}/{fcfg.eoi_id}")
  vae = _load_vae(ev.vae_dir)
  clip_x0 = None if ev.clip_x0 == 0 else (float(ev.clip_x0) if ev.clip_x0 > 0 else (None if vae else 1.0))
  records = read_records(data, data.eval_split, ev.num_examples)
  shape = generate_image.latent_shape(fcfg)
  bad = [r["id"] for r in records if tuple(r["latent"].shape) != shape]
  if bad:
    raise ConfigError(f"data.{data.eval_split}: record id={bad[0]!r} has a latent of shape "
                      f"{records[0]['latent'].shape}, the model expects {shape}")
  caption_ids = [encode(r["caption"]) for r in records]
  rows_per_batch = _batch_rows(data, mesh)
  result = {"checkpoint": str(checkpoint), "num_examples": len(records), "devices": len(jax.devices())}

  # Text NLL on held-out captions as plain text.
  result.update(held_out_text_metrics(params, lcfg, fcfg, data, caption_ids, mesh))

  # Diffusion loss on held-out caption-first pairs at fixed timesteps.
  docs = [layout_document(r["id"], ids, r["latent"], caption_first=True, special=special,
                          tokens_per_image=fcfg.tokens_per_image) for r, ids in zip(records, caption_ids)]
  packed = list(pack_documents(docs, int(data.text_len), int(data.image_slots), shape))
  d_batches = _stack(packed, rows_per_batch, empty_row(int(data.text_len), int(data.image_slots), shape))
  spec = ts.StepSpec(lcfg, fcfg, dcfg, ("image",), 1)
  timesteps = sorted({min(int(t), dcfg.num_timesteps - 1) for t in ev.timesteps})
  d_losses = diffusion_losses(params, spec, d_batches, timesteps, int(ev.noise_seed), mesh)
  for t, v in d_losses.items():
    result[f"diffusion_loss_t{t}"] = v
  result["diffusion_loss_mean"] = float(np.mean(list(d_losses.values())))

  # Captioning: CIDEr-D (+ accuracy for labelled data).
  model = sharded.merge(*sharded.graphdef_and_abstract_state(lcfg, fcfg), params)
  latents = np.stack([r["latent"] for r in records])
  captions = caption_lib.caption_images(model, tokenizer, latents, max_new_tokens=int(ev.caption_max_new_tokens),
                                        batch_size=int(ev.batch_size))
  cands = {i: c for i, c in enumerate(captions)}
  refs = {i: references_for(r, data.dataset) for i, r in enumerate(records)}
  result["cider_d"], _ = metrics.cider_d(cands, refs)
  labelled = all(r["label"] is not None for r in records)
  if labelled:
    result["caption_accuracy"] = metrics.caption_accuracy(captions, [r["label"] for r in records])
  result["caption_examples"] = [{"caption": c, "reference": refs[i][0]} for i, c in enumerate(captions[:5])]

  # Generation: accuracy under a classifier fitted on real training images; FID.
  prompts, prompt_labels = generation_prompts(records, data.dataset, 10, int(ev.samples_per_class),
                                              int(ev.num_generated))
  gen_latents = sample_batched(model, [encode(p) for p in prompts], dcfg, ev, clip_x0, pad_id)
  gen_images = generate_image.to_float_images(gen_latents, vae)
  result["num_generated"] = len(prompts)
  clf = None
  if prompt_labels is not None:
    train = read_records(data, data.split)
    if any(r["label"] is None for r in train):
      raise ConfigError(f"data.{data.split}: records without labels; cannot fit the image classifier")
    clf = metrics.fit_digit_classifier(generate_image.to_float_images(np.stack([r["latent"] for r in train]), vae),
                                       [r["label"] for r in train])
    result["generation_accuracy"] = metrics.generation_accuracy(clf, gen_images, prompt_labels)
  if feature_fn is None and clf is not None:
    feature_fn = metrics.digit_feature_fn(clf)
  result["fid"] = None
  if ev.fid and feature_fn is not None:
    real = generate_image.to_float_images(latents, vae)
    result["fid"] = metrics.fid_from_images(real, gen_images, feature_fn)
  return result


def evaluate_text_nll(checkpoint, config=None, overrides: Sequence[str] = (), *, mesh=None) -> dict:
  """Only the held-out text metrics of `checkpoint` (e.g. of the converted base model, to show that LMFusion
  training left the text side's outputs bit-identical)."""
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer
  loaded = model_loading.load_model(checkpoint, mesh=mesh)
  cfg = resolve_config(loaded, config, overrides)
  encode = CaptionEncoder(load_tokenizer(cfg.data.tokenizer_dir))
  records = read_records(cfg.data, cfg.data.eval_split, cfg.eval.num_examples)
  return held_out_text_metrics(loaded.params, loaded.llama, loaded.fusion, cfg.data,
                               [encode(r["caption"]) for r in records], loaded.mesh)


def to_json(result: dict) -> str:
  return json.dumps(result, sort_keys=True)
