"""Hugging Face Llama checkpoints <-> our `text` parameter tree, one tensor at a time.

The mapping is declarative: `TEXT_RULES` lists, for every leaf of our tree (see models/llama.py), the HF
tensor name (a template over the layer index for stacked layer weights) and how the tensor is transformed.
There are only two transforms, both exact (no arithmetic, so a round trip is bitwise):
  copy    the same array                       (embeddings, RMSNorm weights)
  linear  HF nn.Linear weight [out, in]  <->  ours [*in_dims, *out_dims] = W.T reshaped
          (q [embed, heads, head_dim], o [heads, head_dim, embed], gate [embed, mlp], lm_head [embed, vocab])
RoPE needs no permutation: our attention uses HF's rotate-half layout, and neither side folds the
1/sqrt(head_dim) query scale into q.

Reading uses `safetensors.safe_open` per tensor (the file is mapped only while that tensor is copied out),
for a single `model.safetensors`, a set of shards with `model.safetensors.index.json`, or loose
`*.safetensors` files. Only safetensors and JSON are ever read (never pickle).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.models.llama import layer_param_shapes
from lmfusion_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some HF checkpoints carry that hold no learned weights; skipped on import.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ConversionError(UserError):
  """A checkpoint cannot be converted; the message names the file, tensor or field at fault."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One leaf of our `text` tree and its HF tensor(s)."""
  ours: str              # "/"-joined path in our tree, e.g. "layers/q"
  hf: str                # HF tensor name; "{i}" = layer index for stacked layer weights
  kind: str              # "copy" | "linear"
  n_in: int = 1          # linear only: how many leading dims of our (per-layer) shape form nn.Linear's input

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


TEXT_RULES: Tuple[TensorRule, ...] = (
    TensorRule("embed", "model.embed_tokens.weight", "copy"),
    TensorRule("layers/attn_norm", "model.layers.{i}.input_layernorm.weight", "copy"),
    TensorRule("layers/q", "model.layers.{i}.self_attn.q_proj.weight", "linear"),
    TensorRule("layers/k", "model.layers.{i}.self_attn.k_proj.weight", "linear"),
    TensorRule("layers/v", "model.layers.{i}.self_attn.v_proj.weight", "linear"),
    TensorRule("layers/o", "model.layers.{i}.self_attn.o_proj.weight", "linear", n_in=2),
    TensorRule("layers/ffn_norm", "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    TensorRule("layers/gate", "model.layers.{i}.mlp.gate_proj.weight", "linear"),
    TensorRule("layers/up", "model.layers.{i}.mlp.up_proj.weight", "linear"),
    TensorRule("layers/down", "model.layers.{i}.mlp.down_proj.weight", "linear"),
    TensorRule("final_norm", "model.norm.weight", "copy"),
    TensorRule("lm_head", "lm_head.weight", "linear"),
)


def text_rules(cfg: LlamaConfig) -> Tuple[TensorRule, ...]:
  """The rules that apply to this config (no lm_head with tied embeddings)."""
  return tuple(r for r in TEXT_RULES if not (r.ours == "lm_head" and cfg.tie_embeddings))


def text_param_shapes(cfg: LlamaConfig) -> Dict[str, Tuple[int, ...]]:
  """Our `text` leaves ("/"-joined path -> full shape, layers stacked)."""
  shapes = {"embed": (cfg.vocab_size, cfg.dim), "final_norm": (cfg.dim,), "lm_head": (cfg.dim, cfg.vocab_size)}
  shapes.update({f"layers/{k}": tuple(s) for k, (s, _, _) in layer_param_shapes(cfg).items()})
  return shapes


def _unit_shape(rule: TensorRule, cfg: LlamaConfig) -> Tuple[int, ...]:
  """Our shape of one HF tensor (one layer's slice for stacked weights)."""
  shape = text_param_shapes(cfg)[rule.ours]
  return shape[1:] if rule.per_layer else shape


def hf_shape(rule: TensorRule, cfg: LlamaConfig) -> Tuple[int, ...]:
  ours = _unit_shape(rule, cfg)
  if rule.kind == "copy":
    return ours
  return (math.prod(ours[rule.n_in:]), math.prod(ours[:rule.n_in]))


def to_ours(rule: TensorRule, hf_array: np.ndarray, unit_shape: Sequence[int]) -> np.ndarray:
  if rule.kind == "copy":
    return hf_array
  return hf_array.T.reshape(unit_shape)


def to_hf(rule: TensorRule, our_array: np.ndarray, hf_shape_: Sequence[int]) -> np.ndarray:
  if rule.kind == "copy":
    return np.ascontiguousarray(our_array)
  return np.ascontiguousarray(our_array.reshape(hf_shape_[1], hf_shape_[0]).T)


def hf_names(rule: TensorRule, cfg: LlamaConfig) -> list:
  return [rule.hf.format(i=i) for i in range(cfg.n_layers)] if rule.per_layer else [rule.hf]


# --- Reading ----------------------------------------------------------------------------------------------
class HFCheckpoint:
  """Lazy view of the safetensors files of a HF model folder: names, shapes and dtypes from the headers,
  tensors read one at a time."""

  def __init__(self, hf_dir):
    self.dir = epath.Path(hf_dir)
    if not self.dir.is_dir():
      raise ConversionError(f"{self.dir}: not a directory (expected a Hugging Face model folder)")
    self.files: Dict[str, str] = {}    # tensor name -> file name
    index = self.dir / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from e
      for fname in sorted(set(weight_map.values())):
        if not (self.dir / fname).exists():
          raise ConversionError(f"{index} lists shard {fname!r}, but {self.dir / fname} does not exist")
      self.files = dict(weight_map)
    else:
      shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
      if not shards:
        raise ConversionError(f"{self.dir}: no *.safetensors files and no {INDEX_FILE} "
                              f"(only safetensors checkpoints are supported)")
      for fname in shards:
        with _open_safetensors(self.dir / fname) as f:
          for name in f.keys():
            if name in self.files:
              raise ConversionError(f"tensor {name!r} appears in both {self.files[name]} and {fname}")
            self.files[name] = fname
    self._headers: Dict[str, Tuple[Tuple[int, ...], str]] = {}

  def names(self):
    return list(self.files)

  def _header(self, name: str):
    if name not in self._headers:
      self._require(name)
      fname = self.files[name]
      with _open_safetensors(self.dir / fname) as f:
        for n in f.keys():
          sl = f.get_slice(n)
          self._headers[n] = (tuple(sl.get_shape()), sl.get_dtype())
      if name not in self._headers:
        raise ConversionError(f"{self.dir / fname}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
    return self._headers[name]

  def _require(self, name: str):
    if name not in self.files:
      where = INDEX_FILE if (self.dir / INDEX_FILE).exists() else ", ".join(sorted(set(self.files.values())))
      raise ConversionError(f"{self.dir}: tensor {name!r} is missing (looked in {where})")

  def shape(self, name: str) -> Tuple[int, ...]:
    return self._header(name)[0]

  def dtype(self, name: str) -> str:
    """Our dtype name of a tensor ("float32" | "bfloat16" | "float16")."""
    st = self._header(name)[1]
    if st not in SAFETENSORS_DTYPES:
      raise ConversionError(f"{self.dir / self.files[name]}: tensor {name!r} has dtype {st}; "
                            f"expected one of {sorted(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[st]

  def read(self, name: str) -> np.ndarray:
    """One tensor as a numpy array (the file is mapped only during this call)."""
    self._require(name)
    with _open_safetensors(self.dir / self.files[name]) as f:
      return self._check_finite(name, f.get_tensor(name), ())

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (see `read_slice`)."""
    return self.read_slice(name, (slice(start, stop),))

  def read_slice(self, name: str, index: Tuple[slice, ...]) -> np.ndarray:
    """The box `index` (slices, leading dims) of a tensor; the file is mapped only during this call, so
    reading a large tensor box by box keeps at most one box of the file resident."""
    self._require(name)
    with _open_safetensors(self.dir / self.files[name]) as f:
      return self._check_finite(name, f.get_slice(name)[index], index)

  def _check_finite(self, name: str, values: np.ndarray, index: Tuple[slice, ...]) -> np.ndarray:
    """`values` (the box `index` of tensor `name`) if every value is finite; else ConversionError naming the
    tensor and the first bad element. Checked while streaming, so a broken checkpoint never converts."""
    if values.dtype.kind in "fcV" and values.size:
      bad = ~np.isfinite(values)
      if bad.any():
        first = np.argwhere(bad)[0]
        starts = [s.start or 0 for s in index] + [0] * (len(first) - len(index))
        where = tuple(int(i) + int(s) for i, s in zip(first, starts))
        raise ConversionError(f"{self.dir / self.files[name]}: tensor {name!r} has {int(bad.sum())} NaN/Inf "
                              f"value(s) in the part read (first at index {list(where)}); the checkpoint is "
                              f"broken (re-download or re-export it)")
    return values

  def read_box(self, rule: TensorRule, cfg: LlamaConfig, index: Tuple[slice, ...], dtype: str) -> np.ndarray:
    """The box `index` of our leaf `rule.ours` (layers stacked) in `dtype`, read from only the parts of the
    HF tensors it covers: rows of the per-layer tensors for copies; for a linear, the rectangle
    [out rows, in columns] of each layer's HF weight, transposed into our [*in_dims, *out_dims] order."""
    full = text_param_shapes(cfg)[rule.ours]
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, full))
    out = np.empty(tuple(s.stop - s.start for s in index), NUMPY_DTYPES[dtype])
    if rule.per_layer:
      for i, name in enumerate(hf_names(rule, cfg)[index[0]]):
        self._unit_box_into(rule, name, full[1:], index[1:], out[i])
    else:
      self._unit_box_into(rule, rule.hf, full, index, out)
    return out

  def _unit_box_into(self, rule: TensorRule, name: str, unit: Tuple[int, ...], index: Tuple[slice, ...],
                     out: np.ndarray) -> None:
    """Writes box `index` of one HF tensor, in our (per-layer) layout `unit`, into `out` (C-contiguous)."""
    if rule.kind == "copy":
      out[...] = self.read_slice(name, index)
      return
    in_idx = _flat_indices(index[:rule.n_in], unit[:rule.n_in])     # HF columns, ascending
    out_idx = _flat_indices(index[rule.n_in:], unit[rule.n_in:])    # HF rows, ascending
    c0, c1, r0, r1 = in_idx[0], in_idx[-1] + 1, out_idx[0], out_idx[-1] + 1
    rect = self.read_slice(name, (slice(r0, r1), slice(c0, c1)))  # HF [out rows, in columns]
    if len(in_idx) != c1 - c0 or len(out_idx) != r1 - r0:         # the box is not one HF rectangle
      rect = rect[np.ix_(out_idx - r0, in_idx - c0)]
    out.reshape(len(in_idx), len(out_idx))[...] = rect.T           # a view of `out`: no extra copy


  def read_into(self, rule: TensorRule, name: str, out: np.ndarray, block_bytes: int = 64 * 2**20) -> None:
    """Reads HF tensor `name` into `out` (our layout, any dtype), converting block by block of rows."""
    shape = self.shape(name)
    if rule.kind == "copy":
      target = out.reshape(shape[0], -1)                               # HF rows = our leading axis
    else:
      target = out.reshape(math.prod(out.shape[:rule.n_in]), -1).T    # view [out, in], same as HF
    row_bytes = max(1, math.prod(shape[1:]) * NUMPY_DTYPES[self.dtype(name)].itemsize)
    step = max(1, block_bytes // row_bytes)
    for r in range(0, shape[0], step):
      block = self.read_rows(name, r, min(r + step, shape[0]))
      target[r:r + block.shape[0]] = block.reshape(block.shape[0], -1)

@contextlib.contextmanager
def _open_safetensors(path):
  """safe_open(path) for numpy; a truncated or non-safetensors file raises ConversionError naming it."""
  try:
    f = safe_open(os.fspath(path), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ConversionError(f"{path}: not a readable safetensors file ({e}); the file is truncated, "
                          f"corrupt or in another format (re-download or re-export it)") from e
  with f:
    yield f


def _flat_indices(index: Tuple[slice, ...], dims: Tuple[int, ...]) -> np.ndarray:
  """Row-major flat indices (ascending) of the box `index` of an array of shape `dims`."""
  grids = np.ix_(*[np.arange(s.start, s.stop) for s in index])
  return np.ravel_multi_index(grids, dims).reshape(-1)


def read_config(hf_dir, **overrides) -> LlamaConfig:
  """LlamaConfig from `hf_dir/config.json` (ConfigError names the file and field on bad input)."""
  return LlamaConfig.from_hf_file(epath.Path(hf_dir) / "config.json", **overrides)


def checkpoint_dtype(ckpt: HFCheckpoint, cfg: LlamaConfig, rules: Optional[Sequence[TensorRule]] = None) -> str:
  """The dtype of the checkpoint's weights; float32 if they are mixed (lossless for bf16/fp16). `rules`
  default to text_rules(cfg) (a LLaVA folder passes its renamed ones, convert/hf_llava.py)."""
  rules = text_rules(cfg) if rules is None else rules
  return common_dtype(ckpt, [n for rule in rules for n in hf_names(rule, cfg)])


def common_dtype(ckpt: HFCheckpoint, names) -> str:
  """The dtype the tensors `names` share; float32 if they are mixed (lossless for bf16/fp16)."""
  dtypes = {ckpt.dtype(n) for n in names}
  return dtypes.pop() if len(dtypes) == 1 else "float32"


def validate(ckpt: HFCheckpoint, cfg: LlamaConfig) -> None:
  """Checks every expected tensor exists with the shape config.json implies, and nothing unknown is
  present, before anything is written. Raises ConversionError naming the tensor and file."""
  expected = check_tensors(ckpt, cfg, text_rules(cfg))
  unknown = [n for n in ckpt.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
  if unknown:
    raise ConversionError(f"{ckpt.dir}: unexpected tensor(s) for a Llama model: {sorted(unknown)[:8]}"
                          f"{' ...' if len(unknown) > 8 else ''}")


def check_tensors(ckpt: HFCheckpoint, cfg: LlamaConfig, rules: Sequence[TensorRule]) -> set:
  """Checks the tensors of `rules` exist with the shapes config.json implies and a supported dtype (else
  ConversionError naming the tensor and file); returns their names."""
  expected = set()
  for rule in rules:
    want = hf_shape(rule, cfg)
    for name in hf_names(rule, cfg):
      expected.add(name)
      got = ckpt.shape(name)
      if got != want:
        raise ConversionError(f"{ckpt.dir / ckpt.files[name]}: tensor {name!r} has shape {list(got)}, but "
                              f"config.json implies {list(want)}")
      ckpt.dtype(name)
  return expected


def iter_text_leaves(ckpt: HFCheckpoint, cfg: LlamaConfig, dtype: str,
                     rules: Optional[Sequence[TensorRule]] = None) -> Iterator[Tuple[str, np.ndarray]]:
  """Yields (our "/"-path, numpy array in `dtype`) one leaf at a time. Each leaf (layers stacked) is
  preallocated and filled from the HF tensors in row blocks, so host memory holds one leaf plus one block.
  `rules` default to text_rules(cfg)."""
  np_dtype = NUMPY_DTYPES[dtype]
  for rule in (text_rules(cfg) if rules is None else rules):
    unit = _unit_shape(rule, cfg)
    names = hf_names(rule, cfg)
    out = np.empty((len(names),) + unit if rule.per_layer else unit, np_dtype)
    for i, name in enumerate(names):
      ckpt.read_into(rule, name, out[i] if rule.per_layer else out)
    yield rule.ours, out
    del out


def embed_rms(ckpt: HFCheckpoint, cfg: LlamaConfig, dtype: str, block_bytes: int = 64 * 2**20,
              name: str = "model.embed_tokens.weight") -> np.float32:
  """RMS of our `embed` leaf in `dtype` (what `models.fusion.embed_rms` computes), read in row blocks and
  accumulated in float64, so the embedding is never whole in memory. `name`: the HF tensor (a LLaVA folder's
  is elsewhere)."""
  rows, dim = ckpt.shape(name)
  step = max(1, block_bytes // (dim * 8))
  total = 0.0
  for r in range(0, rows, step):
    block = ckpt.read_rows(name, r, min(r + step, rows)).astype(NUMPY_DTYPES[dtype]).astype(np.float64)
    total += float(np.square(block).sum())
  return np.float32(math.sqrt(total / (rows * dim)))


def nest(flat: Dict[str, np.ndarray]) -> dict:
  """{"layers/q": x, "embed": y} -> {"layers": {"q": x}, "embed": y}."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def load_hf_text_params(hf_dir, dtype: Optional[str] = None) -> Tuple[LlamaConfig, dict]:
  """Whole HF checkpoint -> (LlamaConfig, `text` pure dict of numpy arrays). Holds the model in memory;
  the `convert-llama` command streams leaves into a checkpoint instead."""
  ckpt = HFCheckpoint(hf_dir)
  cfg = read_config(hf_dir)
  validate(ckpt, cfg)
  dtype = dtype or checkpoint_dtype(ckpt, cfg)
  cfg = cfg.replace(param_dtype=dtype)
  return cfg, nest(dict(iter_text_leaves(ckpt, cfg, dtype)))
