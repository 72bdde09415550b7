"""The params checkpoint: model weights (no optimizer state) plus the model config, in one directory.

Layout:
  CKPT/lmfusion.json   {"format": 1, "llama": {LlamaConfig fields}, "fusion": {FusionConfig fields} | null}
  CKPT/params/         Orbax checkpoint of the pure dict {"text": {...}, "image": {...}}
                       (`image` is absent in a text-only checkpoint, e.g. a converted Llama)
  CKPT/tokenizer/      the model's tokenizer files, when the writer was given them (convert-llama copies
                       the Hugging Face folder's), so the checkpoint is all `sample`/`generate` need

Writing is atomic: everything goes to `CKPT.lmfusion-tmp` first and is renamed into place at the end;
on gs:// (no directory rename) it is written in place and `lmfusion.json` is written last, so a
checkpoint without it is incomplete and refused on read. Reading restores against an abstract target
built on the CURRENT mesh from the model's logical axis names, so a checkpoint written on one mesh (or
on one CPU by `convert-llama`) loads sharded on any other.

`ParamsWriter` also takes `LazyArray` leaves (a shape, a dtype and a function returning any box of
values): it stores a zero placeholder through Orbax, then fills the stored array chunk by chunk through
TensorStore with the spec Orbax itself reads it with. The result is an ordinary Orbax checkpoint, and a
converter never holds more than one stored chunk of a leaf (see BENCHMARKS.md, convert_memory).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
import orbax.checkpoint as ocp_v0
from orbax.checkpoint import multihost
import orbax.checkpoint.experimental.v1 as ocp
import tensorstore as ts

from lmfusion_jax.checkpoints.files import (TOKENIZER_FILES, CheckpointError, copy_tokenizer_files,  # noqa: F401
                                           has_tokenizer, missing_or_empty, write_text)
from lmfusion_jax.models.config import (DTYPES, ConfigError, FusionConfig, LlamaConfig, fusion_config_from,
                                        llama_config_from)
from lmfusion_jax.models import sharded
from lmfusion_jax.progress import Progress

CONFIG_FILE = "lmfusion.json"
PARAMS_DIR = "params"
# Where Orbax (v1 layout) keeps the pytree inside PARAMS_DIR; `LazyArray` leaves are filled there.
PYTREE_DIR = "state"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
TMP_SUFFIX = ".lmfusion-tmp"


# --- Config -----------------------------------------------------------------------------------------------
def _config_json(llama_cfg: LlamaConfig, fusion_cfg: Optional[FusionConfig], extra: Optional[dict] = None) -> str:
  """lmfusion.json; `extra` adds entries (a LLaVA checkpoint's "llava", checkpoints/llava.py)."""
  return json.dumps({"format": FORMAT_VERSION, "llama": dataclasses.asdict(llama_cfg),
                     "fusion": dataclasses.asdict(fusion_cfg) if fusion_cfg is not None else None,
                     **(extra or {})}, indent=2)


def read_model_config(path) -> Tuple[LlamaConfig, Optional[FusionConfig]]:
  """(LlamaConfig, FusionConfig or None) stored with a params checkpoint."""
  p = epath.Path(path)
  f = p / CONFIG_FILE
  if not f.exists():
    what = "no such directory" if not p.exists() else f"no {CONFIG_FILE} (incomplete or not a params checkpoint)"
    raise CheckpointError(f"{p}: {what}")
  try:
    d = json.loads(f.read_text())
    llama = llama_config_from(d["llama"])
    fusion = fusion_config_from(d["fusion"]) if d.get("fusion") is not None else None
  except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
    raise CheckpointError(f"{f}: cannot read the model config: {e}") from e
  return llama, fusion


# --- Writing ----------------------------------------------------------------------------------------------
def _is_remote(p: epath.Path) -> bool:
  return "://" in str(p)


def _path(path) -> epath.Path:
  """epath.Path; local paths made absolute (Orbax requires it)."""
  p = epath.Path(path)
  return p if _is_remote(p) else p.resolve()


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
  """A leaf that `ParamsWriter` writes without ever holding it whole: `fill(index)` returns the values at
  `index` (a tuple of one slice per dimension, steps of 1) as a numpy array of that box's shape and `dtype`.
  The same LazyArray may appear at several places of a tree (e.g. an image-branch copy of a text weight):
  each box is then produced once and written to every place."""
  shape: Tuple[int, ...]
  dtype: np.dtype
  fill: Callable[[Tuple[slice, ...]], np.ndarray]

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "dtype", np.dtype(self.dtype))

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))


def _is_lazy(x) -> bool:
  return isinstance(x, LazyArray)


def chunk_boxes(shape: Tuple[int, ...], chunk: Tuple[int, ...]):
  """The boxes (tuples of slices) of a regular chunk grid over `shape`, in C order."""
  grid = [range(0, n, c) for n, c in zip(shape, chunk)]
  for starts in itertools.product(*grid):
    yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, shape))


class ParamsWriter:
  """Writes a params checkpoint piece by piece, so a converter never holds the whole model:

      with ParamsWriter(path, llama_cfg) as w:
        w.write({"text": {"embed": embed}})
        w.write({"text": {"layers": {"q": LazyArray(shape, dtype, fill)}}})  # each call adds new leaves

  Leaves are numpy or jax arrays, or `LazyArray`s: those are written chunk by chunk (one stored chunk of
  at most `chunk_bytes` in memory at a time) when the block exits. Nothing is left at `path` if the block
  raises. Single process only (the converters run on one host); `save_params` handles multi-host arrays.
  """

  def __init__(self, path, llama_cfg: LlamaConfig, fusion_cfg: Optional[FusionConfig] = None,
               overwrite: bool = False, chunk_bytes: Optional[int] = 64 * 2**20,
               progress_desc: Optional[str] = None, tokenizer_dir=None, extra_config: Optional[dict] = None,
               extra_files: Optional[Dict[str, bytes]] = None):
    self.path = _path(path)
    self.tokenizer_dir = tokenizer_dir   # given: its tokenizer files are stored under CKPT/tokenizer
    self.extra_config = extra_config     # more lmfusion.json entries
    self.extra_files = extra_files or {}  # relative path -> bytes, written into the checkpoint before the commit
    self.progress_desc = progress_desc  # given: report the LazyArray chunks written (MiB, MiB/s, ETA)
    # Stored chunks of <= chunk_bytes: a host restoring onto a sharded mesh reads only the chunks it needs,
    # and a LazyArray is converted one chunk at a time (None: one chunk per array, the whole leaf at once).
    self.chunk_bytes = chunk_bytes
    self.llama_cfg, self.fusion_cfg = llama_cfg, fusion_cfg
    self.overwrite = overwrite
    self._dir = None
    self._written = 0
    self._lazy: Dict[int, Tuple[LazyArray, List[str]]] = {}  # id -> (leaf, Orbax parameter names)

  def __enter__(self) -> "ParamsWriter":
    if jax.process_count() > 1:
      raise CheckpointError("ParamsWriter is single-process; use save_params for multi-host arrays")
    _check_target(self.path, self.overwrite)
    self._dir = self.path if _is_remote(self.path) else _tmp_path(self.path)
    _remove(self._dir)
    self._dir.mkdir(parents=True)
    return self

  def write(self, tree: dict) -> None:
    # LazyArrays go to Orbax as zero-stride placeholders (no memory); their values are filled at exit.
    stored = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape) if _is_lazy(x) else x,
                          tree, is_leaf=_is_lazy)
    names = ocp_v0.tree.get_param_names(stored)
    for leaf, name in zip(jax.tree.leaves(tree, is_leaf=_is_lazy), jax.tree.leaves(names)):
      if _is_lazy(leaf):
        self._lazy.setdefault(id(leaf), (leaf, []))[1].append(name)
    ctx = ocp.Context()
    ctx.array.saving.storage_options.chunk_byte_size = self.chunk_bytes
    ctx.memory.deepcopy_host_arrays = False  # the save is synchronous: the caller's arrays cannot change
    with ctx:
      ocp.partial.save(self._dir / PARAMS_DIR, stored)
    self._written += 1

  def _fill_lazy(self) -> None:
    """Writes every LazyArray into its stored (placeholder) arrays, one stored chunk at a time."""
    if not self._lazy:
      return
    pytree_dir = self._dir / PARAMS_DIR / PYTREE_DIR
    if not (pytree_dir / "manifest.ocdbt").exists():
      raise CheckpointError(f"{pytree_dir}: no OCDBT manifest where Orbax was expected to write the params "
                            f"(unsupported orbax-checkpoint layout; write plain arrays instead)")
    context = ocp_v0.type_handlers.get_ts_context(use_ocdbt=True)
    total = sum(leaf.size * leaf.dtype.itemsize * len(names) for leaf, names in self._lazy.values()) / 2**20
    with Progress(total, self.progress_desc or "", "MiB", enabled=None if self.progress_desc else False) as p:
      for leaf, names in self._lazy.values():
        self._fill_leaf(leaf, names, pytree_dir, context, p)

  def _fill_leaf(self, leaf: LazyArray, names: List[str], pytree_dir, context, progress) -> None:
    stores = []
    for name in names:
      info = ocp_v0.type_handlers.ParamInfo(name=name, parent_dir=pytree_dir, is_ocdbt_checkpoint=True,
                                            use_zarr3=True)
      spec = ocp_v0.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
      # chunks equal to the fill value (an all-zero leaf) must be stored too: a skipped chunk leaves the
      # shard entry Orbax's placeholder wrote dangling (the checkpoint would not read back)
      spec["store_data_equal_to_fill_value"] = True
      store = ts.open(ts.Spec(spec), open=True, context=context).result()
      if tuple(store.shape) != leaf.shape or np.dtype(store.dtype.numpy_dtype) != leaf.dtype:
        raise CheckpointError(f"{pytree_dir}: stored {name} is {store.dtype.name}{list(store.shape)}, "
                              f"expected {leaf.dtype}{list(leaf.shape)}")
      stores.append(store)
    chunks = {tuple(s.chunk_layout.write_chunk.shape) for s in stores}
    groups = [stores] if len(chunks) == 1 else [[s] for s in stores]
    for group in groups:
      self._fill_stores(leaf, group, names, progress)

  @staticmethod
  def _fill_stores(leaf: LazyArray, stores: list, names: List[str], progress=None) -> None:
    for box in chunk_boxes(leaf.shape, tuple(stores[0].chunk_layout.write_chunk.shape)):
      values = np.asarray(leaf.fill(box))
      want = tuple(s.stop - s.start for s in box)
      if values.shape != want or values.dtype != leaf.dtype:
        raise CheckpointError(f"{' / '.join(names)}: the values for box {box} are {values.dtype}"
                              f"{list(values.shape)}, expected {leaf.dtype}{list(want)}")
      # Each write is committed before the next starts: at most one chunk is being encoded and written.
      for store in stores:
        store[box].write(values, can_reference_source_data_indefinitely=True).result()
      if progress is not None:
        progress.update(values.nbytes * len(stores) / 2**20)
      del values

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      _remove(self._dir)
      return
    try:
      if not self._written:
        raise CheckpointError(f"{self.path}: nothing was written")
      ocp.partial.finalize(self._dir / PARAMS_DIR)
      self._fill_lazy()
      if self.tokenizer_dir:
        copy_tokenizer_files(self.tokenizer_dir, self._dir / TOKENIZER_DIR)
      for rel, data in self.extra_files.items():
        (self._dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (self._dir / rel).write_bytes(data)
      _commit(self._dir, self.path, self.llama_cfg, self.fusion_cfg, self.overwrite, self.extra_config)
    except BaseException:
      _remove(self._dir)
      raise


def save_params(path, params: dict, llama_cfg: LlamaConfig, fusion_cfg: Optional[FusionConfig] = None,
                overwrite: bool = False) -> epath.Path:
  """Saves {"text": ..., ["image": ...]} (numpy or jax arrays, sharded over any mesh, multi-host) with the
  model config. Atomic: nothing appears at `path` unless everything was written. Call on every process."""
  path = _path(path)
  if set(params) - {"text", "image"} or "text" not in params:
    raise CheckpointError(f"save_params: expected top-level keys 'text' [and 'image'], got {sorted(params)}")
  primary = multihost.is_primary_host(0)
  work = path if _is_remote(path) else _tmp_path(path)
  if primary:
    _check_target(path, overwrite)
    _remove(work)
    work.mkdir(parents=True)
  multihost.sync_global_processes("lmfusion_save_params_start")
  try:
    ocp.save(work / PARAMS_DIR, params)
    multihost.sync_global_processes("lmfusion_save_params_written")
    if primary:
      _commit(work, path, llama_cfg, fusion_cfg, overwrite)
  except BaseException:
    if primary:
      _remove(work)
    raise
  multihost.sync_global_processes("lmfusion_save_params_done")
  return path


def _tmp_path(path: epath.Path) -> epath.Path:
  return path.parent / (path.name + TMP_SUFFIX)


def _check_target(path: epath.Path, overwrite: bool) -> None:
  if path.exists() and not overwrite:
    raise CheckpointError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")


def _remove(p: Optional[epath.Path]) -> None:
  if p is not None and p.exists():
    p.rmtree()


def _commit(work: epath.Path, path: epath.Path, llama_cfg, fusion_cfg, overwrite: bool,
            extra: Optional[dict] = None) -> None:
  """Writes lmfusion.json (last: it marks the checkpoint complete) and moves `work` to `path`."""
  write_text((path if work == path else work) / CONFIG_FILE, _config_json(llama_cfg, fusion_cfg, extra))
  if work == path:  # remote: written in place
    return
  if path.exists() and overwrite:
    path.rmtree()
  work.rename(path)


# --- Reading ----------------------------------------------------------------------------------------------
def _select(tree: Any, subtree: Optional[str], what: str):
  if not subtree:
    return tree
  node = tree
  for part in subtree.strip("/").split("/"):
    if not isinstance(node, dict) or part not in node:
      raise CheckpointError(f"{what}: no entry {subtree!r} (have {sorted(node) if isinstance(node, dict) else 'a leaf'})")
    node = node[part]
  return node


def _wrap(value, subtree: Optional[str]):
  if not subtree:
    return value
  for part in reversed(subtree.strip("/").split("/")):
    value = {part: value}
  return value


def string_keys(tree):
  """The same tree with every dict key turned into its string form."""
  return {str(k): string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def keys_like(tree, like):
  """`tree` with the dict keys of `like` (int or str), matched by their string form."""
  if not isinstance(like, dict):
    return tree
  return {k: keys_like(tree[k] if k in tree else tree[str(k)], v) for k, v in like.items()}


def _flat(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not isinstance(x, dict))[0]
  return {"/".join(str(k.key) for k in path): v for path, v in leaves}


# What a complete params/ folder holds (orbax's layout); a missing one names the damaged file in messages
# (the first three are checked before any read; `d` only explains a failed read).
PARAMS_FILES = ("_CHECKPOINT_METADATA", f"{PYTREE_DIR}/_METADATA", f"{PYTREE_DIR}/manifest.ocdbt", f"{PYTREE_DIR}/d")


def _missing_files(p: epath.Path) -> list:
  return missing_or_empty(p / PARAMS_DIR, PARAMS_FILES)


def _damaged(p: epath.Path, error: Exception) -> CheckpointError:
  """A CheckpointError naming the params checkpoint and its missing/empty files (or orbax's complaint)."""
  bad = _missing_files(p)
  where = f"missing or empty: {', '.join(f'{PARAMS_DIR}/{f}' for f in bad)}" if bad else \
      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  return CheckpointError(f"params checkpoint {p} is damaged or unreadable ({where})")


def stored_metadata(path) -> dict:
  """Shapes and dtypes on disk: pure dict of objects with .shape and .dtype."""
  p = _path(path)
  read_model_config(p)  # refuses incomplete checkpoints
  if any(f in _missing_files(p) for f in PARAMS_FILES[:3]):   # before orbax starts reads that would fail
    raise _damaged(p, FileNotFoundError())
  try:
    meta = ocp.metadata(p / PARAMS_DIR).metadata
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise _damaged(p, e) from e
  if not isinstance(meta, dict):
    raise _damaged(p, ValueError("no parameter metadata"))
  return meta


def load_params(path, mesh: Optional[Mesh] = None, shardings: Optional[dict] = None,
                subtree: Optional[str] = None, dtype: Optional[str] = None):
  """Restores a params checkpoint (or the part named by `subtree`, e.g. "text" or "text/layers/q"; with
  `shardings` for text / image only, a LLaVA checkpoint's vision part is left on disk).

  Shardings: `shardings` (a pytree matching the restored part) if given; else derived on `mesh` from the
  model's logical axis names; else everything on the first local device. `dtype` casts on restore.
  Returns the pure dict (or the leaf) at `subtree`.
  """
  p = _path(path)
  llama_cfg, fusion_cfg = read_model_config(p)
  on_disk = _select(stored_metadata(p), subtree, f"{p / PARAMS_DIR}")
  extra_parts = _extra_parts(p)
  expected = _select({**sharded.abstract_params(llama_cfg, fusion_cfg), **extra_parts}, subtree,
                     "the model described by lmfusion.json")
  if not subtree and shardings is not None and extra_parts:   # the parts `shardings` names (text / image of a
    on_disk = {k: v for k, v in on_disk.items() if k in shardings}   # LLaVA checkpoint, without its vision)
    expected = {k: v for k, v in expected.items() if k in shardings}
  disk_flat, exp_flat = _flat(on_disk), _flat(expected)
  missing = sorted(set(exp_flat) - set(disk_flat))
  unexpected = sorted(set(disk_flat) - set(exp_flat))
  if missing or unexpected:
    raise CheckpointError(f"{p}: parameters do not match {CONFIG_FILE}: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
  for k, meta in disk_flat.items():
    if tuple(meta.shape) != tuple(exp_flat[k].shape):
      raise CheckpointError(f"{p}: parameter {subtree + '/' if subtree else ''}{k} has shape "
                            f"{list(meta.shape)} on disk, the config implies {list(exp_flat[k].shape)}")
  if dtype is not None and dtype not in DTYPES:
    raise CheckpointError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  if shardings is None:
    if mesh is not None:   # the extra parts (a LLaVA vision side: frozen, small) are replicated
      replicated = NamedSharding(mesh, PartitionSpec())
      shardings = _select({**sharded.model_shardings(llama_cfg, fusion_cfg, mesh),
                           **jax.tree.map(lambda _: replicated, extra_parts)}, subtree, "shardings")
    else:
      device = SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, on_disk)
  # Orbax stores the integer keys of nnx.List entries (U-Net blocks) as strings; match by string form.
  target = jax.tree.map(
      lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), DTYPES[dtype] if dtype else np.dtype(m.dtype), sharding=s),
      on_disk, string_keys(shardings))
  ctx = ocp.Context()
  ctx.pytree.loading.partial_load = True
  try:
    with ctx:
      restored = ocp.load(p / PARAMS_DIR, _wrap(target, subtree))
  except Exception as e:  # orbax / tensorstore raise many types for missing or corrupt chunks
    raise _damaged(p, e) from e
  return keys_like(_select(restored, subtree, "restored tree"), expected)


def _extra_parts(p: epath.Path) -> dict:
  """Abstract trees of the parts lmfusion.json declares besides text / image: {"vision": ...} for a LLaVA
  checkpoint (checkpoints/llava.py), else {}."""
  from lmfusion_jax.checkpoints import llava
  return {"vision": llava.vision_abstract(llava.read_llava(p))} if llava.is_llava(p) else {}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=_is_lazy)))
