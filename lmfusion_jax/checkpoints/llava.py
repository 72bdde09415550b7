"""The LLaVA part of a params checkpoint (written by convert-llava, convert/llava_checkpoint.py):

  CKPT/lmfusion.json   "llava": {"hf_layout": ..., "vision_dtype": ...} next to the text model's config
  CKPT/llava/          the HF folder's config.json, preprocessor_config.json and generation_config.json, verbatim
                       (what export-llava writes back, and what `read_llava` parses)
  CKPT/params/vision   LlavaVision's parameters: tower, projector (+ image_newline), frozen

`read_llava(ckpt)` -> LlavaConfig (the text config from lmfusion.json, the vision dtype as stored);
`vision_abstract(cfg)` -> the restore target of the `vision` part (checkpoints/params.load_params restores it).
"""
from __future__ import annotations

from etils import epath
from flax import nnx

from lmfusion_jax.checkpoints.files import CheckpointError

CONFIG_FILE = "lmfusion.json"      # = checkpoints.params.CONFIG_FILE (params imports this module)
LLAVA_DIR = "llava"
ENTRY = "llava"
HF_FILES = ("config.json", "preprocessor_config.json", "generation_config.json")


def _lmfusion_json(path) -> dict:
  from lmfusion_jax.checkpoints.vae import read_json
  return read_json(epath.Path(path) / CONFIG_FILE, "a params checkpoint's model config (incomplete or not one?)")


def is_llava(path) -> bool:
  return _lmfusion_json(path).get(ENTRY) is not None


def require_llava(path, what: str) -> None:
  if not is_llava(path):
    raise CheckpointError(f"{path}: {what} needs a LLaVA checkpoint (from convert-llava); this one has no "
                          f"\"{ENTRY}\" entry in {CONFIG_FILE}")


def read_llava(path):
  """LlavaConfig of a LLaVA params checkpoint (CheckpointError naming the file when it is not one)."""
  from lmfusion_jax.convert.hf_llava import read_llava_config
  from lmfusion_jax.errors import UserError
  from lmfusion_jax.models.config import llama_config_from
  p = epath.Path(path)
  d = _lmfusion_json(p)
  if d.get(ENTRY) is None:
    raise CheckpointError(f"{p / CONFIG_FILE}: not a LLaVA checkpoint (no \"{ENTRY}\" entry; convert-llava "
                          f"writes one)")
  try:
    cfg = read_llava_config(p / LLAVA_DIR, d[ENTRY]["hf_layout"])
    return cfg.replace(text=llama_config_from(d["llama"]),
                       vision=cfg.vision.replace(param_dtype=d[ENTRY]["vision_dtype"]))
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"{p / CONFIG_FILE}: the \"{ENTRY}\" entry lacks {e}") from e
  except UserError as e:
    raise CheckpointError(f"{p / LLAVA_DIR}: {e}") from e


def vision_abstract(cfg) -> dict:
  """Pure dict of ShapeDtypeStructs of LlavaVision(cfg) (allocates nothing)."""
  from lmfusion_jax.models.llava import LlavaVision
  abstract = nnx.eval_shape(lambda: LlavaVision(cfg, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def entry(hf_layout: str, vision_dtype: str) -> dict:
  """The lmfusion.json entry convert-llava writes."""
  return {ENTRY: {"hf_layout": hf_layout, "vision_dtype": vision_dtype}}


def hf_file_bytes(hf_dir) -> dict:
  """{"llava/config.json": bytes, ...}: the HF files (those present) a LLaVA checkpoint keeps verbatim."""
  d = epath.Path(hf_dir)
  return {f"{LLAVA_DIR}/{name}": (d / name).read_bytes() for name in HF_FILES if (d / name).exists()}


def stored_hf_files(path) -> dict:
  """{file name: bytes} of the HF files kept under CKPT/llava/."""
  d = epath.Path(path) / LLAVA_DIR
  return {name: (d / name).read_bytes() for name in HF_FILES if (d / name).exists()}
