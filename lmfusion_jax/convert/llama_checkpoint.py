"""A Hugging Face Llama folder <-> a params checkpoint, as library functions (the CLI's convert-llama and
export-llama call these; so does the demo).

  convert(hf_dir, out, fusion_cfg=...)   HF safetensors -> params checkpoint: `text` is the Llama and `image`
                                         starts as copies of it (+ fresh image in/out modules)
  export(checkpoint, out)                the `text` branch -> HF folder, bit-identical to what went in

Streams: every parameter leaf is a `checkpoints.params.LazyArray` that the writer fills one stored chunk at a
time, reading only the part of the safetensors that chunk covers, so host memory stays near one chunk, not one
leaf or the model (an image-branch copy is written from the same chunk, read once). Every tensor is checked
against config.json before anything is written; on any error nothing is left at `out`. Export reads the
checkpoint one leaf at a time.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Optional, Union

import jax
import numpy as np

from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.convert import hf_export, hf_llama
from lmfusion_jax.models import decoder, fusion
from lmfusion_jax.models.config import ConfigError, FusionConfig, LlamaConfig


def convert(hf_dir, out, *, dtype: Optional[str] = None,
            fusion_cfg: Union[None, FusionConfig, Callable[[LlamaConfig], FusionConfig]] = None,
            seed: int = 0, overwrite: bool = False, chunk_mib: int = 64,
            chunk_bytes: Optional[int] = None, progress_desc: Optional[str] = None) -> tuple:
  """Converts and writes; returns (LlamaConfig, FusionConfig | None, number of parameters written).

  `fusion_cfg` None writes the text branch only; a callable gets the checkpoint's LlamaConfig (to
  validate ids against the vocabulary) before anything is written. Stored chunks are `chunk_mib` MiB
  (0: one per array), or exactly `chunk_bytes` bytes when given. `progress_desc` given: the MiB written are
  reported (lmfusion_jax.progress) under that name."""
  check_conversion_args(chunk_mib, dtype, chunk_bytes)
  ckpt = hf_llama.HFCheckpoint(hf_dir)
  cfg = hf_llama.read_config(hf_dir)
  hf_llama.validate(ckpt, cfg)
  dtype = dtype or hf_llama.checkpoint_dtype(ckpt, cfg)
  cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
  if callable(fusion_cfg):
    fusion_cfg = fusion_cfg(cfg)
  if chunk_bytes is None:
    chunk_bytes = chunk_mib * 2**20 if chunk_mib > 0 else None
  rules = hf_llama.text_rules(cfg)
  tree = {"text": lazy_text_tree(ckpt, cfg, rules, dtype)}
  if fusion_cfg is not None:
    tree["image"] = image_tree(ckpt, cfg, fusion_cfg, tree["text"], rules, dtype, seed)
  tokenizer = hf_dir if params_io.has_tokenizer(hf_dir) else None   # travels with the checkpoint
  with params_io.ParamsWriter(out, cfg, fusion_cfg, overwrite=overwrite, chunk_bytes=chunk_bytes,
                              progress_desc=progress_desc, tokenizer_dir=tokenizer) as w:
    w.write(tree)
  return cfg, fusion_cfg, params_io.count_params(tree)


def check_conversion_args(chunk_mib, dtype, chunk_bytes=None) -> None:
  """The flags convert-llama and convert-llava share, checked before anything is read."""
  if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, int) or chunk_mib < 0:
    raise ConfigError(f"chunk_mib={chunk_mib!r} (--chunk-mib): expected an integer >= 0 (0 = one chunk per array)")
  if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                  or chunk_bytes < 1):
    raise ConfigError(f"chunk_bytes={chunk_bytes!r}: expected an integer >= 1")
  if dtype is not None and dtype not in hf_llama.NUMPY_DTYPES:
    raise ConfigError(f"dtype={dtype!r} (--dtype): expected one of {sorted(hf_llama.NUMPY_DTYPES)}")


def lazy_text_tree(ckpt: hf_llama.HFCheckpoint, cfg: LlamaConfig, rules, dtype: str) -> dict:
  """The `text` tree of LazyArrays, each filled chunk by chunk from the HF tensors of `rules`."""
  shapes = hf_llama.text_param_shapes(cfg)
  return hf_llama.nest({rule.ours: params_io.LazyArray(shapes[rule.ours], hf_llama.NUMPY_DTYPES[dtype],
                                                       functools.partial(ckpt.read_box, rule, cfg, dtype=dtype))
                        for rule in rules})


def image_tree(ckpt: hf_llama.HFCheckpoint, cfg: LlamaConfig, fusion_cfg: FusionConfig, text: dict, rules,
               dtype: str, seed: int) -> dict:
  """The `image` branch: fresh in/out modules and final norm copy; with image_init="copy" the layers are the
  text tree's own LazyArrays (exact copies, written from the same chunks)."""
  by_ours = {rule.ours: rule for rule in rules}
  final_norm = ckpt.read_box(by_ours["final_norm"], cfg, (slice(None),), dtype)
  rms = hf_llama.embed_rms(ckpt, cfg, dtype, name=by_ours["embed"].hf)  # image tokens' scale (match_token_scale)
  image = _image_rest(cfg, fusion_cfg, final_norm, rms, seed)
  if fusion_cfg.image_init == "copy" and _image_layer_keys(fusion_cfg):
    image["layers"] = {k: text["layers"][k] for k in _image_layer_keys(fusion_cfg)}
  return image


def _image_layer_keys(fusion_cfg):
  return () if fusion_cfg is None else decoder.IMAGE_LAYER_KEYS[fusion_cfg.separation]


def _image_rest(cfg, fusion_cfg, final_norm, embed_rms, seed):
  """The image branch minus the streamed layer copies: final norm copy and fresh in/out modules.
  With image_init="copy" the layers are lazy copies of the text leaves, so `init_image_params` is asked
  for none (separation="none"); with "random" it draws them too (and returns no `layers` if none are owned)."""
  text_stub = {"layers": {}, "final_norm": final_norm}
  drawn = fusion_cfg.replace(separation="none") if fusion_cfg.image_init == "copy" else fusion_cfg
  return jax.tree.map(np.asarray, fusion.init_image_params(cfg, drawn, text_stub, seed, embed_rms))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
  """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise ConfigError(f"--max-shard-size={text!r}: expected a size like 5GB, 500MB or 2GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export(checkpoint, out, dtype=None, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
           tokenizer_dir=None):
  """The text branch of any kind of checkpoint (params checkpoint, training workdir or step dir) -> a HF
  folder, with the tokenizer that travels with the checkpoint (or `tokenizer_dir`). A params checkpoint is
  read one leaf at a time; a training checkpoint's text branch is restored whole on the host first.
  Returns (LlamaConfig, the dtype written, the tokenizer folder copied or None)."""
  from lmfusion_jax.checkpoints.resolve import resolve
  from lmfusion_jax.inference import loading
  kind, path, _ = resolve(checkpoint)
  tokenizer_dir = tokenizer_dir or loading.checkpoint_tokenizer(checkpoint)
  if kind == "params":
    cfg, _ = params_io.read_model_config(path)
    meta = params_io.stored_metadata(path)
    if "text" not in meta:
      raise CheckpointError(f"{path}: no `text` branch to export")
    stored = str(np.dtype(meta["text"]["embed"].dtype))
    get_leaf = lambda leaf: np.asarray(params_io.load_params(path, subtree=f"text/{leaf}"))
  else:
    cfg, text = loading.load_text(checkpoint)
    text = jax.tree.map(np.asarray, text)
    stored = str(text["embed"].dtype)

    def get_leaf(leaf):
      node = text
      for part in leaf.split("/"):
        node = node[part]
      return node
  dtype = dtype or stored
  if dtype not in hf_llama.NUMPY_DTYPES:
    raise ConfigError(f"{path}: stored dtype {dtype!r} cannot be exported; pass --dtype")
  hf_export.write_hf_checkpoint(out, cfg.replace(param_dtype=dtype), get_leaf, dtype,
                                max_shard_bytes=max_shard_bytes, overwrite=overwrite, tokenizer_dir=tokenizer_dir)
  return cfg, dtype, tokenizer_dir
