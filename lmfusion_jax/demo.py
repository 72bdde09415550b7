"""The built-in demo, end to end on this machine (CPU is enough), on the embedded digits data or on 5,000 real
MNIST digits (`data.dataset`: "digits", configs/demo_digits.py, or "mnist", configs/demo_mnist.py):

  1. build the dataset (TFDS ArrayRecord) and train a small BPE tokenizer with Llama-3 specials;
  2. pretrain a tiny Llama-3-shaped text LM on text (standing in for a downloaded Llama-3): the captions of
     the training split, captions followed by a fact about their number, number sentences, and (as web
     text keeps a marker where an image was) BOI/EOI image markers around some of those texts;
  3. export it to a Hugging Face folder and convert it back with convert-llama (the real user path),
     which writes the LMFusion params checkpoint (text + image copies);
  4. train LMFusion from it with the text frozen;
  5. evaluate (captioning / generation accuracy, CIDEr-D, diffusion loss, text NLL before vs after),
     sample a grid of digits per prompt (each row labelled by its prompt) and write DIR/report.md.
Every stage writes into the workdir and is skipped when its output already exists (training resumes).
"""
from __future__ import annotations

import time

import jax
import numpy as np
from etils import epath

from lmfusion_jax import sharding
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.checkpoints.files import write_json, write_text
from lmfusion_jax.data.cache import caption_with_fact, number_sentences
from lmfusion_jax.errors import UserError
from lmfusion_jax.training import text_pretrain
from lmfusion_jax.models.config import llama_config_from, fusion_config_from


DATA_NAMES = {"digits": "embedded 8x8 digits data (scikit-learn)",
              "mnist": "5,000 real MNIST digits (28x28, padded; CC BY-SA 3.0)"}


def grid_scale(cfg) -> int:
  """Upscaling of the grid's images: 4x for 8x8 digits, to about 64 pixels for larger ones."""
  return max(1, 64 // int(cfg.fusion.latent_size)) if cfg.data.dataset != "digits" else 4


def log(msg):
  print(f"[demo] {msg}", flush=True)


def prepare_data(cfg, workdir: epath.Path):
  from lmfusion_jax.data.build import build_dataset
  from lmfusion_jax.data.cache import digits_tokenizer_texts
  from lmfusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
  data_dir = workdir / "tfds"
  if cfg.data.dataset not in ("digits", "mnist"):
    raise UserError(f"demo: data.dataset={cfg.data.dataset!r}; the demo runs on 'digits' or 'mnist'")
  # both datasets caption with the digits templates: one tokenizer corpus
  build_dataset(cfg.data.dataset, str(data_dir), image_size=int(cfg.data.image_size))
  tok_dir = workdir / "tokenizer"
  if not tok_dir.exists():
    train_tokenizer(digits_tokenizer_texts(), int(cfg.demo.tokenizer_vocab), str(tok_dir))
  return str(data_dir), str(tok_dir), load_tokenizer(str(tok_dir))


def text_corpus(data_cfg, split: str) -> list:
  """The text LM's 'web text': the caption texts of a split of the data, each also followed by a
  statement about its number, plus number sentences."""
  from lmfusion_jax.evaluation.setup import read_records
  records = read_records(data_cfg, split)
  captions = [r["caption"] for r in records]
  facts = [caption_with_fact(r["caption"], r["label"], i) for i, r in enumerate(records)]
  return captions + facts + number_sentences() * max(1, len(captions) // (4 * len(number_sentences())))


def placeholder_documents(tokenizer, texts, sp: dict) -> list:
  """Web text keeps a marker where an image was: `BOS text BOI EOI EOS` (image after the text) or
  `BOS BOI EOI text EOS` (image before it), alternating. The LM so learns the BOI/EOI tokens as text."""
  from lmfusion_jax.data.tokenizer import CaptionEncoder
  enc = CaptionEncoder(tokenizer)
  mark = [sp["boi"], sp["eoi"]]
  out = []
  for i, t in enumerate(texts):
    ids = enc(t)
    out.append([sp["bos"]] + (ids + mark if i % 2 == 0 else mark + ids) + [sp["eos"]])
  return out


def pretrain_base_lm(cfg, workdir, tokenizer, mesh) -> str:
  from lmfusion_jax.data.tokenizer import special_ids
  out = workdir / "base_lm"
  if (out / params_io.CONFIG_FILE).exists():
    return str(out)
  sp = special_ids(tokenizer)
  lcfg = llama_config_from(cfg.model).replace(bos_id=sp["bos"], eos_id=sp["eos"])
  corpus = text_corpus(cfg.data, cfg.data.split)
  docs = text_pretrain.encode_documents(tokenizer, corpus, sp["bos"], sp["eos"])
  if cfg.demo.get("image_placeholders", False):
    docs += placeholder_documents(tokenizer, corpus, sp)
  rows = text_pretrain.pack_text(docs, int(cfg.demo.text_seq_len))
  params = text_pretrain.pretrain(lcfg, rows, steps=int(cfg.demo.text_steps), batch_size=int(cfg.demo.text_batch),
                                  lr=float(cfg.demo.text_lr), seed=int(cfg.seed), mesh=mesh,
                                  log_every=max(1, int(cfg.demo.text_steps) // 5), log=log)
  params_io.save_params(str(out), {"text": params}, lcfg)
  return str(out)


def export_and_convert(cfg, workdir, base_lm: str, tokenizer) -> str:
  from lmfusion_jax.convert.llama_checkpoint import convert, export
  from lmfusion_jax.data.tokenizer import special_ids
  hf_dir, converted = workdir / "hf_base_lm", workdir / "converted"
  if not hf_dir.exists():
    export(base_lm, str(hf_dir), tokenizer_dir=cfg.data.tokenizer_dir)   # a complete HF folder
  if not (converted / params_io.CONFIG_FILE).exists():
    sp = special_ids(tokenizer)
    fcfg = fusion_config_from(cfg.fusion).replace(boi_id=sp["boi"], eoi_id=sp["eoi"])
    convert(str(hf_dir), str(converted), fusion_cfg=fcfg, seed=int(cfg.seed))
  return str(converted)


def sample_grid(cfg, run_dir: str, workdir) -> str:
  from lmfusion_jax.data.tfds_digits import WORDS
  from lmfusion_jax.data.tokenizer import CaptionEncoder, load_tokenizer, special_ids
  from lmfusion_jax.inference import image, image_files, loading
  loaded = loading.load_model(run_dir)
  tok = load_tokenizer(cfg.data.tokenizer_dir)
  enc = CaptionEncoder(tok)
  n = int(cfg.demo.samples_per_digit)
  prompts = [f"a handwritten digit {w}" for w in WORDS]
  ids = [enc(p) for p in prompts for _ in range(n)]
  sp = cfg.sampling
  lat = image.generate_images(loaded.model(), ids, loaded.diffusion, num_steps=int(sp.steps),
                              sampler=str(sp.sampler), cfg_scale=float(sp.cfg_scale), eta=float(sp.eta),
                              seed=int(cfg.seed), clip_x0=1.0, pad_id=special_ids(tok)["pad"])
  images = image_files.upscale(image_files.decode_to_images(np.asarray(lat)), grid_scale(cfg))  # [N, H, W, 1]
  grid = image_files.contact_sheet(images, columns=n)
  grid = image_files.label_rows(grid, prompts, row_height=images.shape[1])
  path = workdir / "samples_grid.png"
  image_files.write_png(str(path), grid)
  return str(path)


def write_report(workdir, metrics: dict, timings: dict, paths: dict, cfg) -> str:
  cap, gen = metrics.get("caption_accuracy"), metrics.get("generation_accuracy")
  lines = [
      "# lmfusion-jax demo report", "",
      f"LMFusion on the {DATA_NAMES.get(cfg.data.dataset, cfg.data.dataset)}: a tiny Llama-3-shaped text LM was pretrained on caption text, "
      "exported to Hugging Face format, converted back with `convert-llama`, and extended with image weights "
      "that were trained while every text weight stayed frozen.", "",
      "## Metrics (held-out test split)", "",
      "| metric | value | target |", "|---|---|---|",
      f"| captioning accuracy | {cap:.1%} | >= 90% |" if cap is not None else "| captioning accuracy | n/a | |",
      f"| generation accuracy (independent classifier; {cfg.eval.sampler} {cfg.eval.sampling_steps} steps, "
      f"CFG {cfg.eval.cfg_scale}) | {gen:.1%} | >= 80% (chance 10%) |"
      if gen is not None else "| generation accuracy | n/a | |",
      f"| CIDEr-D of captions | {metrics['cider_d']:.3f} | |",
      f"| diffusion loss (mean over t in {list(metrics.get('timesteps', []))}) | "
      f"{metrics['diffusion_loss_mean']:.4f} | |",
      f"| FID in classifier-logit space (not Inception) | "
      f"{metrics['fid']:.3f} | |" if metrics.get("fid") is not None else "| FID | n/a | |",
      f"| text NLL of the base LM | {metrics['text_nll_base']!r} | |",
      f"| text NLL after LMFusion training | {metrics['text_nll']!r} | bitwise equal |",
      f"| text NLL unchanged to the last bit | {metrics['text_nll_unchanged']} | True |", "",
      "## Samples", "", f"One row per prompt \"a handwritten digit <zero..nine>\" (written left of the row), "
      f"{cfg.demo.samples_per_digit} samples each ({cfg.sampling.sampler}, {cfg.sampling.steps} steps, "
      f"CFG scale {cfg.sampling.cfg_scale}):", "", "![samples](samples_grid.png)", "",
      "## Example captions", "",
  ]
  for ex in metrics.get("caption_examples", []):
    lines.append(f"- generated: \"{ex['caption']}\" | reference: \"{ex['reference']}\"")
  lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  lines += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in paths.items()]
  return str(write_text(workdir / "report.md", "\n".join(lines) + "\n"))


def start_run(cfg, what: str):
  """A demo's set-up: absolute workdir (created), the run's sampling recorded for eval, the mesh, and the stage
  timer: (workdir, mesh, timings {stage: seconds}, lap(stage) that closes a stage)."""
  from lmfusion_jax.checkpoints.files import absolute_path
  from lmfusion_jax.evaluation.setup import fill_sampling
  cfg.workdir = absolute_path(cfg.workdir)
  fill_sampling(cfg)   # eval's open sampling fields = the demo's recorded sampling (the report names them)
  workdir = epath.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.mesh_from_config(cfg.mesh)
  timings, t0 = {}, [time.perf_counter()]

  def lap(name):
    timings[name] = time.perf_counter() - t0[0]
    t0[0] = time.perf_counter()

  log(f"{what} {workdir}; devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  return workdir, mesh, timings, lap


def finish_run(workdir, metrics: dict, timings: dict, paths: dict, write_report_fn) -> dict:
  """metrics.json, the report (`write_report_fn()` -> its path), the files logged; the demo's return value."""
  write_json(workdir / "metrics.json", {"metrics": metrics, "timings_s": timings})
  log(f"report: {write_report_fn()}")
  for k, v in paths.items():
    log(f"  {k}: {v}")
  return {"metrics": metrics, "timings": timings, "paths": paths}


def run_demo(cfg) -> dict:
  from lmfusion_jax.evaluation.evaluate import evaluate, evaluate_text_nll
  from lmfusion_jax.training.loop import train
  workdir, mesh, timings, lap = start_run(cfg, "workdir")
  data_dir, tok_dir, tokenizer = prepare_data(cfg, workdir)
  cfg.data.data_dir, cfg.data.tokenizer_dir = data_dir, tok_dir
  lap("dataset + tokenizer")
  log("pretraining the text LM")
  base_lm = pretrain_base_lm(cfg, workdir, tokenizer, mesh)
  lap("text LM pretraining")
  log("export to Hugging Face format and convert back (convert-llama)")
  converted = export_and_convert(cfg, workdir, base_lm, tokenizer)
  lap("HF export + convert-llama")
  run_dir = workdir / "lmfusion"
  train_cfg = cfg.copy_and_resolve_references()
  train_cfg.workdir, train_cfg.init_from = str(run_dir), converted
  log(f"training LMFusion ({cfg.total_steps} steps, text frozen)")
  train(train_cfg)
  lap("LMFusion training")
  log("evaluating")
  metrics = evaluate(str(run_dir), train_cfg)
  base_nll = evaluate_text_nll(converted, train_cfg)["text_nll"]
  metrics["text_nll_base"] = base_nll
  metrics["text_nll_unchanged"] = bool(np.float64(base_nll) == np.float64(metrics["text_nll"]))
  metrics["timesteps"] = list(cfg.eval.timesteps)
  lap("evaluation")
  grid = sample_grid(train_cfg, str(run_dir), workdir)
  lap("sample grid")
  paths = {"report": str(workdir / "report.md"), "samples": grid, "tokenizer": tok_dir, "dataset": data_dir,
           "base text LM (params checkpoint)": base_lm, "base text LM (Hugging Face)": str(workdir / "hf_base_lm"),
           "converted LMFusion init": converted, "training run": str(run_dir),
           "metrics": str(workdir / "metrics.json")}
  return finish_run(workdir, metrics, timings, paths, lambda: write_report(workdir, metrics, timings, paths, cfg))
