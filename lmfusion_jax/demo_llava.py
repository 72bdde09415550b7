"""The LLaVAFusion demo (the paper's second setting at toy scale), end to end on CPU (configs/demo_llava_digits.py):

  1. the digits dataset and the demo tokenizer, plus an `<image>` special token (within the LM's vocabulary);
  2. the stand-in text LM pretrained as in the digits demo (demo.pretrain_base_lm);
  3. a tiny LLaVA pretrained here (training/llava_pretrain.py): a fresh CLIP ViT tower + projector on that LM,
     on `BOS <image> x N caption EOS` documents of the training digits (each digit fed as a grey uint8 image,
     3 equal channels, through the CLIPImageProcessor it is exported with); written as a LLaVA params
     checkpoint (convert/llava_checkpoint.save_llava);
  4. exported to a Hugging Face LLaVA folder (export_llava; with torch installed, HF's logits on one prompt
     are compared with ours) and converted back with convert_llava + the digits demo's U-Net image branch;
  5. LLaVAFusion training from it with the text (and vision) frozen, the digits demo's recipe;
  6. evaluation: generation accuracy by the independent classifier, the held-out text NLL before vs after, and
     the understanding path's greedy captions of the held-out digits from the VLM vs the trained run (the
     same token ids for every image), then the sample grid and WORKDIR/report.md + metrics.json.
Every stage writes into the workdir and is skipped when its output already exists (training resumes).
"""
from __future__ import annotations

import numpy as np
from etils import epath

from lmfusion_jax import demo
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.checkpoints.files import write_text
from lmfusion_jax.errors import UserError

IMAGE_TOKEN = "<image>"
log = demo.log


def image_tokenizer(tok_dir: str, out: epath.Path):
  """The demo tokenizer plus the `<image>` special token, saved at `out`; returns it."""
  from lmfusion_jax.data.tokenizer import load_tokenizer
  if not out.exists():
    tok = load_tokenizer(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.save_pretrained(str(out))
  return load_tokenizer(str(out))


def digit_images(latents: np.ndarray) -> np.ndarray:
  """Digit latents float [n, S, S, 1] in [-1, 1] -> grey uint8 images [n, S, S] (0..255)."""
  from lmfusion_jax.inference.image_files import float_to_uint8
  return float_to_uint8(np.asarray(latents))[..., 0]


def llava_config(cfg, text_cfg, image_token: int):
  """The VLM: the stand-in LM's config + a CLIP tower on S x S digits, fed through a CLIPImageProcessor that
  keeps the size (mean = std = 0.5: pixels to [-1, 1])."""
  from lmfusion_jax.models.clip import ImageProcessorConfig
  from lmfusion_jax.models.llava import LlavaConfig
  from lmfusion_jax.models.vision_tower import VisionConfig
  lc, size = cfg.demo.llava, int(cfg.data.image_size)
  if image_token >= text_cfg.vocab_size:
    raise UserError(f"model.vocab_size={text_cfg.vocab_size} does not cover the {IMAGE_TOKEN} token (id "
                    f"{image_token}); lower demo.tokenizer_vocab or raise model.vocab_size")
  vision = VisionConfig(variant="clip", image_size=size, num_channels=3, **lc.vision.to_dict())
  proc = ImageProcessorConfig(shortest_edge=size, crop_hw=(size, size), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  return LlavaConfig(text=text_cfg, vision=vision, processor=proc, vision_feature_layer=int(lc.vision_feature_layer),
                     vision_feature_select_strategy="default", projector_hidden_act=str(lc.projector_hidden_act),
                     image_token_index=image_token)


def pixel_inputs(lcfg, images: np.ndarray) -> list:
  from lmfusion_jax.inference.llava_preprocess import preprocess
  return [preprocess(lcfg, im) for im in images]


def text_rows(cfg, tokenizer, sp: dict) -> dict:
  """The stand-in LM's own corpus (demo.text_corpus + image-marker documents), packed: mixed into the LLaVA
  pretraining steps that train the LM, so it keeps its text."""
  from lmfusion_jax.training import text_pretrain
  corpus = demo.text_corpus(cfg.data, cfg.data.split)
  docs = text_pretrain.encode_documents(tokenizer, corpus, sp["bos"], sp["eos"])
  docs += demo.placeholder_documents(tokenizer, corpus, sp)
  return text_pretrain.pack_text(docs, int(cfg.demo.text_seq_len))


def pretrain_vlm(cfg, workdir, tokenizer, base_lm: str) -> str:
  from lmfusion_jax.convert.llava_checkpoint import save_llava
  from lmfusion_jax.data.tokenizer import CaptionEncoder, special_ids
  from lmfusion_jax.evaluation.setup import read_records
  from lmfusion_jax.training import llava_pretrain as lp
  out = workdir / "vlm"
  if (out / params_io.CONFIG_FILE).exists():
    return str(out)
  lc, sp = cfg.demo.llava, special_ids(tokenizer)
  text_cfg, _ = params_io.read_model_config(base_lm)
  lcfg = llava_config(cfg, text_cfg, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
  records = read_records(cfg.data, cfg.data.split)
  tiles = np.concatenate([p.tiles for p in pixel_inputs(lcfg, digit_images([r["latent"] for r in records]))])
  enc = CaptionEncoder(tokenizer)
  rows = lp.caption_rows([enc(r["caption"]) for r in records], num_image_tokens=lcfg.tokens_per_tile,
                         image_token=lcfg.image_token_index, bos=sp["bos"], eos=sp["eos"], pad=sp["pad"],
                         seq_len=int(lc.seq_len))
  params = {"text": params_io.load_params(base_lm, subtree="text"), "vision": lp.init_vision(lcfg, int(cfg.seed))}
  stages = [lp.Stage(("vision",), int(lc.stage1_steps), float(lc.stage1_lr)),
            lp.Stage(("text", "vision"), int(lc.stage2_steps), float(lc.stage2_lr))]
  params = lp.pretrain(lcfg, params, tiles, rows, stages, batch_size=int(lc.batch), seed=int(cfg.seed),
                       text_rows=text_rows(cfg, tokenizer, sp), text_weight=float(lc.text_weight),
                       log_every=max(1, max(s.steps for s in stages) // 4), log=log)
  save_llava(str(out), lcfg, params, tokenizer_dir=cfg.data.tokenizer_dir)
  return str(out)


def export_and_convert(cfg, workdir, vlm: str, tokenizer) -> tuple:
  """(HF folder, convert-llava checkpoint with the image branch)."""
  from lmfusion_jax.convert.llava_checkpoint import convert_llava, export_llava
  from lmfusion_jax.data.tokenizer import special_ids
  from lmfusion_jax.models.config import fusion_config_from
  hf_dir, converted = workdir / "hf_vlm", workdir / "converted"
  if not hf_dir.exists():
    export_llava(vlm, str(hf_dir))
  if not (converted / params_io.CONFIG_FILE).exists():
    sp = special_ids(tokenizer)
    fcfg = fusion_config_from(cfg.fusion).replace(boi_id=sp["boi"], eoi_id=sp["eoi"])
    convert_llava(str(hf_dir), str(converted), fusion_cfg=fcfg, seed=int(cfg.seed))
  return str(hf_dir), str(converted)


def hf_parity(hf_dir: str, vlm: str, image: np.ndarray) -> dict:
  """HF transformers on the exported folder vs ours on the VLM checkpoint, one digit and the prompt
  `BOS <image> x N`: max |logits difference| and max |pixel_values difference| (HF's image processor vs ours).
  Empty without torch."""
  try:
    import torch
    import transformers
  except ImportError:
    return {}
  from lmfusion_jax.inference import llava_generate as gen
  llava = gen.load_llava(vlm)
  pix = pixel_inputs(llava.cfg, image[None])[0]
  prompt = [llava.cfg.text.bos_id] + [llava.cfg.image_token_index] * pix.num_tokens
  model = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
  hf_pix = transformers.AutoImageProcessor.from_pretrained(hf_dir)(
      images=np.repeat(image[..., None], 3, -1), return_tensors="np")["pixel_values"]
  with torch.no_grad():
    hf = model(input_ids=torch.tensor([prompt]), pixel_values=torch.from_numpy(hf_pix)).logits.numpy()
  ours = np.asarray(gen.prompt_logits(llava, [pix], [prompt]))
  return {"hf_loads": True, "hf_logits_max_abs_diff": float(np.max(np.abs(hf - ours))),
          "hf_pixels_max_abs_diff": float(np.max(np.abs(hf_pix.transpose(0, 2, 3, 1) - pix.tiles)))}


def understanding(checkpoint: str, images: np.ndarray, max_new_tokens: int, batch: int) -> tuple:
  """(greedy caption token ids per image, fp32 prompt logits of the first batch as bytes) through the
  understanding path of `checkpoint` (a LLaVA checkpoint or a LLaVAFusion run) for prompts `BOS <image> x N`."""
  from lmfusion_jax.inference import llava_generate as gen
  llava = gen.load_llava(checkpoint)
  pixels = pixel_inputs(llava.cfg, images)
  prompt = [llava.cfg.text.bos_id] + [llava.cfg.image_token_index] * pixels[0].num_tokens
  ids = []
  for start in range(0, len(pixels), batch):
    chunk = pixels[start:start + batch]
    ids += gen.generate(llava, chunk, [prompt] * len(chunk), max_new_tokens)
  logits = np.asarray(gen.prompt_logits(llava, pixels[:batch], [prompt] * len(pixels[:batch])))
  return ids, logits.tobytes()


def understanding_check(cfg, vlm: str, run_dir: str, tokenizer) -> dict:
  """The VLM's greedy captions of the held-out digits before (the VLM checkpoint) vs after LLaVAFusion training
  (the run): identical token ids per image, identical logits; the VLM's captioning accuracy."""
  from lmfusion_jax.evaluation.metrics import caption_accuracy
  from lmfusion_jax.evaluation.setup import read_records
  lc = cfg.demo.llava
  records = read_records(cfg.data, cfg.data.eval_split, int(lc.caption_examples))
  images = digit_images([r["latent"] for r in records])
  before, before_logits = understanding(vlm, images, int(lc.caption_max_new_tokens), int(lc.caption_batch))
  after, after_logits = understanding(run_dir, images, int(lc.caption_max_new_tokens), int(lc.caption_batch))
  texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in before]
  same = sum(a == b for a, b in zip(before, after))
  return {"vlm_caption_accuracy": caption_accuracy(texts, [r["label"] for r in records]),
          "understanding_images": len(records), "understanding_identical": int(same),
          "understanding_unchanged": same == len(records),
          "understanding_logits_unchanged": before_logits == after_logits,
          "vlm_caption_examples": [{"caption": t, "label": r["label"]} for t, r in zip(texts[:5], records)]}


def _row(name: str, value, target: str = "") -> str:
  shown = f"{value:.1%}" if isinstance(value, float) and "accuracy" in name else value
  return f"| {name} | {shown} | {target} |"


def write_report(workdir, metrics: dict, timings: dict, paths: dict, cfg) -> str:
  m, ev = metrics, cfg.eval
  lines = [
      "# lmfusion-jax LLaVAFusion demo report", "",
      "A tiny LLaVA (CLIP ViT tower + projector + a Llama-3-shaped LM) was pretrained here on captioning the embedded "
      "8x8 digits, exported to a Hugging Face LLaVA folder, converted back with `convert_llava`, and given image "
      "generation by LMFusion training with its text and vision weights frozen (LLaVAFusion).", "",
      "## Metrics (held-out test split)", "", "| metric | value | target |", "|---|---|---|",
      _row(f"generation accuracy (independent classifier; {ev.sampler} {ev.sampling_steps} steps, CFG "
           f"{ev.cfg_scale})", m["generation_accuracy"], ">= 80% (chance 10%)"),
      _row("VLM captioning accuracy (understanding path, greedy)", m["vlm_caption_accuracy"]),
      _row("understanding captions identical before / after (images)",
           f"{m['understanding_identical']} / {m['understanding_images']}", "all"),
      _row("understanding outputs unchanged to the bit (tokens and logits)",
           m["understanding_unchanged"] and m["understanding_logits_unchanged"], "True"),
      _row("LMFusion-path captioning accuracy (image branch)", m["caption_accuracy"]),
      _row("text NLL of the VLM", repr(m["text_nll_base"])),
      _row("text NLL after LLaVAFusion training", repr(m["text_nll"]), "bitwise equal"),
      _row("text NLL unchanged to the last bit", m["text_nll_unchanged"], "True"),
      _row("diffusion loss (mean)", f"{m['diffusion_loss_mean']:.4f}"),
      _row("HF transformers loads the export", m.get("hf_loads", "not checked (no torch)"), "True"),
      _row("max abs HF vs ours logits (one prompt)", m.get("hf_logits_max_abs_diff", "n/a"), "<= 1e-4"),
      "", "## Samples", "", "![samples](samples_grid.png)", "", "## VLM captions (greedy)", "",
  ]
  lines += [f"- digit {ex['label']}: \"{ex['caption']}\"" for ex in m["vlm_caption_examples"]]
  lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  lines += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in paths.items()]
  return str(write_text(workdir / "report.md", "\n".join(lines) + "\n"))


def run_llava_demo(cfg) -> dict:
  from lmfusion_jax.evaluation.evaluate import evaluate, evaluate_text_nll
  from lmfusion_jax.evaluation.setup import read_records
  from lmfusion_jax.training.loop import train
  workdir, mesh, timings, lap = demo.start_run(cfg, "LLaVAFusion demo, workdir")
  data_dir, text_tok_dir, _ = demo.prepare_data(cfg, workdir)
  tokenizer = image_tokenizer(text_tok_dir, workdir / "tokenizer_llava")
  cfg.data.data_dir, cfg.data.tokenizer_dir = data_dir, str(workdir / "tokenizer_llava")
  lap("dataset + tokenizer")
  log("pretraining the text LM")
  base_lm = demo.pretrain_base_lm(cfg, workdir, tokenizer, mesh)
  lap("text LM pretraining")
  log("pretraining the LLaVA (vision tower + projector, then all) on digit captioning")
  vlm = pretrain_vlm(cfg, workdir, tokenizer, base_lm)
  lap("LLaVA pretraining")
  log("export to a Hugging Face LLaVA folder and convert back (convert-llava)")
  hf_dir, converted = export_and_convert(cfg, workdir, vlm, tokenizer)
  probe = digit_images([read_records(cfg.data, cfg.data.eval_split, 1)[0]["latent"]])[0]
  hf = hf_parity(hf_dir, vlm, probe)
  lap("HF export + check + convert-llava")
  run_dir = workdir / "llavafusion"
  train_cfg = cfg.copy_and_resolve_references()
  train_cfg.workdir, train_cfg.init_from = str(run_dir), converted
  train_cfg.model = {"preset": "init", "max_seq_len": int(cfg.model.max_seq_len)}
  log(f"training LLaVAFusion ({cfg.total_steps} steps, text and vision frozen)")
  train(train_cfg)
  lap("LLaVAFusion training")
  log("evaluating")
  metrics = evaluate(str(run_dir), train_cfg)
  metrics["text_nll_base"] = evaluate_text_nll(converted, train_cfg)["text_nll"]
  metrics["text_nll_unchanged"] = bool(np.float64(metrics["text_nll_base"]) == np.float64(metrics["text_nll"]))
  metrics.update(hf)
  lap("evaluation")
  log("the understanding path before vs after LLaVAFusion training")
  metrics.update(understanding_check(cfg, vlm, str(run_dir), tokenizer))
  lap("understanding check")
  grid = demo.sample_grid(train_cfg, str(run_dir), workdir)
  lap("sample grid")
  paths = {"report": str(workdir / "report.md"), "samples": grid, "tokenizer (+ <image>)": cfg.data.tokenizer_dir,
           "dataset": data_dir, "stand-in text LM": base_lm, "VLM (LLaVA params checkpoint)": vlm,
           "VLM (Hugging Face LLaVA)": hf_dir, "converted LLaVAFusion init": converted,
           "training run": str(run_dir), "metrics": str(workdir / "metrics.json")}
  return demo.finish_run(workdir, metrics, timings, paths,
                         lambda: write_report(workdir, metrics, timings, paths, cfg))
