"""A Hugging Face LLaVA / LLaVA-NeXT folder <-> a params checkpoint with three parts (the CLI's convert-llava and
export-llava; LLaVAFusion, the paper's second setting):

  text    the VLM's Llama, stored as convert-llama stores a Llama (frozen in LLaVAFusion training)
  vision  models/llava.LlavaVision: tower + projector (+ NeXT image_newline) (frozen; the understanding path)
  image   the generation branch: copies of the text layers + fresh image in/out modules (trained)

  convert_llava(hf_dir, out, fusion_cfg=...)   text leaves stream chunk by chunk from the safetensors as in
                                               convert-llama (the image copies from the same chunks); the vision
                                               leaves (a few hundred MB for a ViT-L) are read one leaf at a time
  save_llava(out, cfg, params)                 a LLaVA trained here (text + vision pure dicts) -> the same kind
                                               of checkpoint, its HF config files synthesized from the LlavaConfig
  export_llava(checkpoint, out)                text + vision -> a HF folder: every tensor under the name it was
                                               read from (checkpoints/llava.py keeps the layout), bit for bit,
                                               with the original config.json / preprocessor_config.json

Every tensor is checked against config.json before anything is written (convert/hf_llava.validate); on any error
nothing is left at `out`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import numpy as np
from etils import epath

from lmfusion_jax.checkpoints import llava as llava_ckpt
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.convert import hf_clip, hf_export, hf_llama, hf_llava, llama_checkpoint
from lmfusion_jax.models.config import FusionConfig, LlamaConfig


def _read_vision_leaf(ckpt: hf_llama.HFCheckpoint, rule: hf_clip.Rule, shape, dtype: str) -> np.ndarray:
  """Our leaf `rule.ours` ([layers, ...] when stacked) in `dtype`, one HF tensor at a time."""
  unit = shape[1:] if rule.per_layer else shape
  parts = [hf_clip.to_ours(rule, ckpt.read(n), unit).astype(hf_llama.NUMPY_DTYPES[dtype], copy=False)
           for n in rule.hf_names("")]
  return np.stack(parts) if rule.per_layer else parts[0]


def convert_llava(hf_dir, out, *, dtype: Optional[str] = None,
                  fusion_cfg: Union[None, FusionConfig, Callable[[LlamaConfig], FusionConfig]] = None,
                  seed: int = 0, overwrite: bool = False, chunk_mib: int = 64, progress_desc: Optional[str] = None):
  """Converts and writes; returns (LlavaConfig, FusionConfig | None, number of parameters written).

  `dtype` applies to the text (and image) part, default the folder's; the vision part keeps the folder's dtype.
  `fusion_cfg` None writes text + vision only (the VLM, e.g. to export it again)."""
  llama_checkpoint.check_conversion_args(chunk_mib, dtype)
  ckpt = hf_llama.HFCheckpoint(hf_dir)
  cfg = hf_llava.read_llava_config(hf_dir, hf_llava.detect_layout(ckpt.names(), str(ckpt.dir)))
  hf_llava.validate(ckpt, cfg)
  t_rules, v_rules = hf_llava.text_rules(cfg), hf_llava.vision_rules(cfg)
  dtype = dtype or hf_llama.checkpoint_dtype(ckpt, cfg.text, t_rules)
  vdtype = hf_llama.common_dtype(ckpt, [n for r in v_rules for n in r.hf_names("")])
  tcfg = cfg.text.replace(param_dtype=dtype, dtype=dtype)
  cfg = cfg.replace(text=tcfg, vision=cfg.vision.replace(param_dtype=vdtype))
  if callable(fusion_cfg):
    fusion_cfg = fusion_cfg(tcfg)
  tree = {"text": llama_checkpoint.lazy_text_tree(ckpt, tcfg, t_rules, dtype)}
  v_shapes = hf_llava.vision_param_shapes(cfg)
  vision = {r.ours: params_io.LazyArray(v_shapes[r.ours], hf_llama.NUMPY_DTYPES[vdtype],
                                        functools.partial(_vision_box, ckpt, r, v_shapes[r.ours], vdtype))
            for r in v_rules}
  tree["vision"] = hf_llama.nest(vision)
  if fusion_cfg is not None:
    tree["image"] = llama_checkpoint.image_tree(ckpt, tcfg, fusion_cfg, tree["text"], t_rules, dtype, seed)
  tokenizer = hf_dir if params_io.has_tokenizer(hf_dir) else None
  with params_io.ParamsWriter(out, tcfg, fusion_cfg, overwrite=overwrite,
                              chunk_bytes=chunk_mib * 2**20 if chunk_mib > 0 else None,
                              progress_desc=progress_desc, tokenizer_dir=tokenizer,
                              extra_config=llava_ckpt.entry(cfg.hf_layout, vdtype),
                              extra_files=llava_ckpt.hf_file_bytes(hf_dir)) as w:
    w.write(tree)
  _cached_vision_leaf.cache_clear()
  return cfg, fusion_cfg, params_io.count_params(tree)


def save_llava(out, cfg, params: dict, *, tokenizer_dir=None, overwrite: bool = False) -> None:
  """A LLaVA trained here -> a LLaVA params checkpoint (what convert-llava writes with no fusion config): `params`
  {"text": Llama pure dict, "vision": LlavaVision pure dict}, and config.json / preprocessor_config.json
  synthesized from `cfg` (hf_llava.llava_config_to_hf / processor_to_hf, saved layout) under CKPT/llava/, so
  export_llava writes a HF folder that LlavaForConditionalGeneration loads."""
  import json
  if sorted(params) != ["text", "vision"]:
    raise CheckpointError(f"save_llava: expected the parts ['text', 'vision'], got {sorted(params)}")
  cfg = cfg.replace(hf_layout="saved")
  files = {f"{llava_ckpt.LLAVA_DIR}/{hf_llava.CONFIG_FILE}": hf_llava.llava_config_to_hf(cfg),
           f"{llava_ckpt.LLAVA_DIR}/{hf_llava.PREPROCESSOR_FILE}": hf_llava.processor_to_hf(cfg)}
  files = {k: (json.dumps(v, indent=2, sort_keys=True) + "\n").encode() for k, v in files.items()}
  with params_io.ParamsWriter(out, cfg.text, None, overwrite=overwrite, tokenizer_dir=tokenizer_dir,
                              extra_config=llava_ckpt.entry(cfg.hf_layout, cfg.vision.param_dtype),
                              extra_files=files) as w:
    w.write(params)


def _vision_box(ckpt, rule, shape, dtype, index) -> np.ndarray:
  """LazyArray fill: the box `index` of the vision leaf (the leaf is read whole once: the tower is small)."""
  return _cached_vision_leaf(ckpt, rule, shape, dtype)[tuple(index)]


@functools.lru_cache(maxsize=1)
def _cached_vision_leaf(ckpt, rule, shape, dtype) -> np.ndarray:
  return _read_vision_leaf(ckpt, rule, shape, dtype)


def export_llava(checkpoint, out, *, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9):
  """A LLaVA params checkpoint (convert-llava's) -> a HF folder that LlavaForConditionalGeneration /
  LlavaNextForConditionalGeneration load: the text and vision tensors under the names they were read from,
  in their stored dtypes, config.json / preprocessor_config.json as they came, the tokenizer files.
  Returns the LlavaConfig."""
  from lmfusion_jax.checkpoints.resolve import resolve
  kind, path, step = resolve(checkpoint)
  if kind != "params":
    raise CheckpointError(f"{checkpoint}: export-llava reads a params checkpoint from convert-llava (the text and "
                          f"vision parts stay frozen in LLaVAFusion training, so the converted checkpoint holds "
                          f"them exactly); this is a training {'workdir' if step is None else 'step'}: pass its "
                          f"init_from")
  llava_ckpt.require_llava(path, "export-llava")
  cfg = llava_ckpt.read_llava(path)
  meta = params_io.stored_metadata(path)
  tdtype = str(np.dtype(meta["text"]["embed"].dtype))
  vdtype = cfg.vision.param_dtype
  entries = []      # (HF name, numpy array getter, shape, dtype)
  for rule in hf_llava.text_rules(cfg):
    shape = hf_llama.hf_shape(rule, cfg.text)
    for i, name in enumerate(hf_llama.hf_names(rule, cfg.text)):
      entries.append((name, functools.partial(_text_tensor, path, rule, cfg.text, i), shape, tdtype))
  v_shapes = hf_llava.vision_param_shapes(cfg)
  packed: dict = {}   # a packed in_proj (SigLIP's head): one HF tensor from three of our leaves (q, k, v)
  for rule in hf_llava.vision_rules(cfg):
    unit = v_shapes[rule.ours][1:] if rule.per_layer else v_shapes[rule.ours]
    for i, name in enumerate(rule.hf_names("")):
      if rule.part is not None:
        packed.setdefault(name, [None, None, None, hf_clip.hf_shape(rule, unit)])[rule.part] = (rule, i)
        continue
      entries.append((name, functools.partial(_vision_tensor, path, rule, i), hf_clip.hf_shape(rule, unit), vdtype))
  for name, (*parts, shape) in packed.items():
    entries.append((name, functools.partial(_packed_tensor, path, parts), shape, vdtype))
  _write_folder(epath.Path(out), entries, llava_ckpt.stored_hf_files(path), path, overwrite, max_shard_bytes)
  return cfg


@functools.lru_cache(maxsize=1)
def _leaf(path: str, subtree: str) -> np.ndarray:
  return np.asarray(params_io.load_params(path, subtree=subtree))


def _text_tensor(path, rule, cfg, i) -> np.ndarray:
  leaf = _leaf(str(path), f"text/{rule.ours}")
  return hf_llama.to_hf(rule, leaf[i] if rule.per_layer else leaf, hf_llama.hf_shape(rule, cfg))


def _vision_tensor(path, rule, i) -> np.ndarray:
  leaf = _leaf(str(path), f"vision/{rule.ours}")
  return hf_clip.to_hf(rule, leaf[i] if rule.per_layer else leaf)


def _packed_tensor(path, parts) -> np.ndarray:
  return np.concatenate([_vision_tensor(path, rule, i) for rule, i in parts], axis=0)


def _write_folder(out: epath.Path, entries, hf_files: dict, ckpt_path, overwrite: bool, max_shard_bytes: int):
  """Safetensors shards (+ index) in `entries` order (hf_export.plan_shards / write_shards: one tensor in memory at a
  time, a shard per dtype run), the kept HF files and the tokenizer."""
  shards = hf_export.plan_shards([(name, tuple(shape), dt) for name, _, shape, dt in entries], max_shard_bytes)

  def tensors():
    for name, get, shape, dt in entries:
      arr = np.asarray(get()).astype(hf_llama.NUMPY_DTYPES[dt], copy=False)
      if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{ckpt_path}: tensor {name} comes out {list(arr.shape)}, expected {list(shape)}")
      yield name, arr

  def fill(tmp):
    hf_export.write_shards(tmp, shards, tensors())
    for name, data in hf_files.items():
      (tmp / name).write_bytes(data)
    tok = epath.Path(ckpt_path) / params_io.TOKENIZER_DIR
    if tok.exists():
      params_io.copy_tokenizer_files(tok, tmp)

  _leaf.cache_clear()
  try:
    return hf_export.write_dir(out, fill, overwrite)
  finally:
    _leaf.cache_clear()
