"""Writing a Hugging Face Llama folder (config.json, generation_config.json, safetensors shards + index) from
our `text` tree, one tensor at a time: the inverse of `convert.hf_llama`'s reading, with the same rules."""
from __future__ import annotations

import json
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from lmfusion_jax.checkpoints.files import write_dir
from lmfusion_jax.convert.hf_llama import (INDEX_FILE, NUMPY_DTYPES, SAFETENSORS_DTYPES, SINGLE_FILE, ConversionError,
                                          hf_names, hf_shape, text_param_shapes, text_rules, to_hf)
from lmfusion_jax.models.config import LlamaConfig

def hf_config_dict(cfg: LlamaConfig, dtype: str) -> dict:
  """config.json for transformers' LlamaForCausalLM (both the 4.x and 5.x spellings of RoPE settings)."""
  hf = cfg.to_hf_dict()
  hf["torch_dtype"] = dtype
  hf["dtype"] = dtype
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope.update(hf["rope_scaling"])
  hf["rope_parameters"] = rope
  return hf


def iter_hf_tensors(cfg: LlamaConfig, get_leaf: Callable[[str], np.ndarray],
                    dtype: Optional[str] = None) -> Iterator[Tuple[str, np.ndarray]]:
  """Yields (HF name, HF-layout array), fetching one of our leaves at a time with `get_leaf(path)`."""
  for rule in text_rules(cfg):
    leaf = np.asarray(get_leaf(rule.ours))
    want = text_param_shapes(cfg)[rule.ours]
    if tuple(leaf.shape) != tuple(want):
      raise ConversionError(f"leaf text/{rule.ours} has shape {list(leaf.shape)}, config implies {list(want)}")
    if dtype is not None:
      leaf = leaf.astype(NUMPY_DTYPES[dtype], copy=False)
    shape = hf_shape(rule, cfg)
    for i, name in enumerate(hf_names(rule, cfg)):
      yield name, to_hf(rule, leaf[i] if rule.per_layer else leaf, shape)
    del leaf


ST_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def hf_entries(cfg: LlamaConfig, dtype: str) -> list:
  """[(HF name, shape, dtype)] of the Llama's tensors in `iter_hf_tensors` order."""
  return [(name, hf_shape(rule, cfg), dtype) for rule in text_rules(cfg) for name in hf_names(rule, cfg)]


def plan_shards(entries: Sequence[Tuple[str, Tuple[int, ...], str]], max_shard_bytes: int) -> list:
  """[[(HF name, shape, dtype), ...] per shard], in order; a shard holds one dtype and closes before it would
  exceed max_shard_bytes (a single larger tensor gets a shard of its own)."""
  shards, cur, cur_bytes = [], [], 0
  for entry in entries:
    _, shape, dtype = entry
    nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
    if cur and (cur_bytes + nbytes > max_shard_bytes or cur[-1][2] != dtype):
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(entry)
    cur_bytes += nbytes
  if cur:
    shards.append(cur)
  return shards


def write_shards(folder, shards: list, tensors: Iterator[Tuple[str, np.ndarray]]) -> None:
  """The safetensors files of `shards` (plan_shards) in `folder`, filled from `tensors` ((HF name, array) in plan
  order, one in memory at a time), and the index when there are several."""
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  for fname, entries in zip(names, shards):
    writer = SafetensorsStreamWriter(folder / fname, [(n, shape) for n, shape, _ in entries], entries[0][2])
    for _ in entries:
      writer.write(*next(tensors))
    writer.close()
  if next(tensors, None) is not None:
    raise ConversionError("export: more tensors than planned")
  if len(shards) > 1:
    total = sum(math.prod(shape) * NUMPY_DTYPES[dt].itemsize for entries in shards for _, shape, dt in entries)
    weight_map = {n: fname for fname, entries in zip(names, shards) for n, _, _ in entries}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


class SafetensorsStreamWriter:
  """Writes one .safetensors file tensor by tensor (header first, from the known names/shapes/dtype), so
  the file's tensors are never all in memory. Same bytes layout as safetensors' own writer."""

  def __init__(self, path, entries: Sequence[Tuple[str, Tuple[int, ...]]], dtype: str):
    self.entries, self.dtype, self.next = list(entries), NUMPY_DTYPES[dtype], 0
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in self.entries:
      nbytes = math.prod(shape) * self.dtype.itemsize
      header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self.f = epath.Path(path).open("wb")
    self.f.write(len(raw).to_bytes(8, "little") + raw)

  def write(self, name: str, arr: np.ndarray) -> None:
    want, shape = self.entries[self.next]
    if name != want or tuple(arr.shape) != tuple(shape) or arr.dtype != self.dtype:
      raise ConversionError(f"safetensors writer: got {name} {arr.shape} {arr.dtype}, expected {want} {shape}")
    self.f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    self.next += 1

  def close(self) -> None:
    self.f.close()
    if self.next != len(self.entries):
      raise ConversionError(f"safetensors writer: {len(self.entries) - self.next} tensors were not written")


def write_hf_checkpoint(out_dir, cfg: LlamaConfig, get_leaf: Callable[[str], np.ndarray],
                        dtype: str, max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                        tokenizer_dir=None) -> epath.Path:
  """Writes a HF folder (config.json, generation_config.json, safetensors shards [+ index], and the
  tokenizer files of `tokenizer_dir` when given) that `transformers.LlamaForCausalLM.from_pretrained` and
  `AutoTokenizer.from_pretrained` load, holding one of our leaves at a time. Written into a temporary
  folder, then renamed."""
  out = epath.Path(out_dir)
  if out.exists() and not overwrite:
    raise ConversionError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
  shards = plan_shards(hf_entries(cfg, dtype), max_shard_bytes)

  def fill(tmp):
    write_shards(tmp, shards, iter_hf_tensors(cfg, get_leaf, dtype))
    (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2))
    gen = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_dir:
      from lmfusion_jax.checkpoints.files import copy_tokenizer_files
      copy_tokenizer_files(tokenizer_dir, tmp)

  return write_dir(out, fill, overwrite)
