"""Hugging Face CLIP / SigLIP weights -> the Flax CLIP (models/clip.py) and vision tower (models/vision_tower.py),
and the converted CLIP folder written / read back.

Reading: only config.json, preprocessor_config.json and safetensors (numpy API, one tensor at a time, through
convert.hf_llama.HFCheckpoint: a single file, shards with an index, or loose files), never pickle. The mapping is
declarative (`Rule`: our "/"-path, the HF name, a layout kind); the kinds:
  copy    the same array                               (embeddings tables, logit_scale)
  vec     HF [n] -> ours reshaped (biases [H*K] -> [H, K]; LayerNorm weights; CLS)
  probe   HF [1, 1, D] -> ours [D]                     (SigLIP head probe)
  linear  HF nn.Linear [out, in] -> ours [*in_dims, *out_dims] = W.T reshaped
  conv    HF Conv2d [D, C, P, P] -> ours HWIO [P, P, C, D]
`part` picks a third of the rows of the SigLIP head's packed in_proj (q, k, v). Every tensor is checked (present,
shape implied by config.json) before any is used, and every tensor under the tower's prefix must be used: a
missing, wrongly shaped or unexpected one is a ConversionError naming the file and the tensor.

Vision towers are found under any of the prefixes HF writes: "" (transformers 5 CLIPVisionModel /
SiglipVisionModel), "vision_model." (CLIPModel, older vision models), "vision_tower." and
"vision_tower.vision_model." (LLaVA), with or without a leading "model.".

The converted folder (`lmfusion-jax convert-clip`) is written and read by checkpoints/clip.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from etils import epath
from flax import nnx

from lmfusion_jax.checkpoints.vae import read_json
from lmfusion_jax.convert.hf_llama import ConversionError, HFCheckpoint
from lmfusion_jax.models.clip import CLIP, CLIPConfig, ImageProcessorConfig, TextConfig
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.models.params import abstract_split
from lmfusion_jax.models.vision_tower import VisionConfig, VisionTower

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_TAG = "lmfusion_jax.clip/1"
IGNORED_SUFFIXES = (".position_ids",)    # a non-persistent buffer some older checkpoints carry
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
PATCH_TENSOR = "embeddings.patch_embedding.weight"
# The top-level modules of a HF vision tower: every tensor under them must be used.
VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")
# The HF defaults of each vision config (what a config.json may leave out).
VISION_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh", vision_use_head=True),
}
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5,
                     hidden_act="quick_gelu", eos_token_id=49407)


# --- configs ------------------------------------------------------------------------------------------------

def _get(d: dict, name: str, default, kind, source: str):
  """d[name] (or `default`) as a `kind`; ConversionError naming the field otherwise."""
  value = d.get(name, default)
  if kind is int and isinstance(value, (list, tuple)) and len(set(value)) == 1:   # SigLIP's [224, 224]
    value = value[0]
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    raise ConversionError(f"{source}: field {name!r}={value!r} is not {what}")
  return value


def vision_config_from_hf(d: dict, source: str = CONFIG_FILE) -> VisionConfig:
  """VisionConfig from a HF config dict: a CLIPVisionConfig / SiglipVisionConfig, or any config with a
  `vision_config` of one (CLIPModel, SiglipModel, LLaVA)."""
  if "vision_config" in d:
    d, source = d["vision_config"] or {}, f"{source} (vision_config)"
  model_type = d.get("model_type")
  variant = VISION_MODEL_TYPES.get(model_type)
  if variant is None:
    raise ConversionError(f"{source}: model_type is {model_type!r}; expected a CLIP or SigLIP vision tower "
                          f"({sorted(VISION_MODEL_TYPES)}, or a model config with a 'vision_config' of one)")
  dflt = VISION_DEFAULTS[variant]
  kw = dict(
      variant=variant,
      hidden_size=_get(d, "hidden_size", dflt["hidden_size"], int, source),
      intermediate_size=_get(d, "intermediate_size", dflt["intermediate_size"], int, source),
      num_layers=_get(d, "num_hidden_layers", dflt["num_hidden_layers"], int, source),
      num_heads=_get(d, "num_attention_heads", dflt["num_attention_heads"], int, source),
      image_size=_get(d, "image_size", dflt["image_size"], int, source),
      patch_size=_get(d, "patch_size", dflt["patch_size"], int, source),
      num_channels=_get(d, "num_channels", dflt["num_channels"], int, source),
      layer_norm_eps=_get(d, "layer_norm_eps", dflt["layer_norm_eps"], float, source),
      hidden_act=_get(d, "hidden_act", dflt["hidden_act"], str, source),
      use_head=variant == "siglip" and _get(d, "vision_use_head", dflt.get("vision_use_head"), bool, source))
  try:
    return VisionConfig(**kw)
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from e


def clip_config_from_hf(d: dict, source: str = CONFIG_FILE) -> CLIPConfig:
  """CLIPConfig from a HF CLIPModel config.json dict; anything but model_type 'clip' is refused by name."""
  model_type = d.get("model_type")
  if model_type != "clip":
    raise ConversionError(f"{source}: model_type is {model_type!r}, not 'clip' (expected a Hugging Face CLIPModel "
                          f"folder, e.g. a copy of openai/clip-vit-large-patch14)")
  t, ts = d.get("text_config") or {}, f"{source} (text_config)"
  try:
    text = TextConfig(
        vocab_size=_get(t, "vocab_size", TEXT_DEFAULTS["vocab_size"], int, ts),
        hidden_size=_get(t, "hidden_size", TEXT_DEFAULTS["hidden_size"], int, ts),
        intermediate_size=_get(t, "intermediate_size", TEXT_DEFAULTS["intermediate_size"], int, ts),
        num_layers=_get(t, "num_hidden_layers", TEXT_DEFAULTS["num_hidden_layers"], int, ts),
        num_heads=_get(t, "num_attention_heads", TEXT_DEFAULTS["num_attention_heads"], int, ts),
        max_position_embeddings=_get(t, "max_position_embeddings", TEXT_DEFAULTS["max_position_embeddings"], int,
                                     ts),
        layer_norm_eps=_get(t, "layer_norm_eps", TEXT_DEFAULTS["layer_norm_eps"], float, ts),
        hidden_act=_get(t, "hidden_act", TEXT_DEFAULTS["hidden_act"], str, ts),
        eos_token_id=_get(t, "eos_token_id", TEXT_DEFAULTS["eos_token_id"], int, ts))
    vision = vision_config_from_hf({**d.get("vision_config", {}), "model_type": "clip_vision_model"},
                                   f"{source} (vision_config)")
    return CLIPConfig(text, vision, _get(d, "projection_dim", 512, int, source))
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from e


def image_processor_from_hf(hf_dir, image_size: int) -> ImageProcessorConfig:
  """The CLIPImageProcessor settings of `hf_dir/preprocessor_config.json`, or CLIP's defaults at `image_size`
  when the folder has none. The processed image must be image_size x image_size."""
  path = epath.Path(hf_dir) / PREPROCESSOR_FILE
  if not path.exists():
    return ImageProcessorConfig.default_for(image_size)
  d = read_json(path, f"the image processor's {PREPROCESSOR_FILE}")
  kind = d.get("image_processor_type", d.get("feature_extractor_type", "CLIPImageProcessor"))
  if not str(kind).startswith(("CLIPImageProcessor", "CLIPFeatureExtractor")):
    raise ConversionError(f"{path}: image_processor_type is {kind!r}; only CLIPImageProcessor's preprocessing "
                          f"is reproduced")

  def hw(field: str, value) -> Tuple[int, int]:
    if isinstance(value, int):
      return value, value
    if isinstance(value, dict) and {"height", "width"} <= set(value):
      return int(value["height"]), int(value["width"])
    raise ConversionError(f"{path}: field {field!r}={value!r}: expected an int or {{'height', 'width'}}")

  size = d.get("size", image_size)
  shortest, resize_hw = None, None
  if isinstance(size, int):
    shortest = size
  elif isinstance(size, dict) and "shortest_edge" in size:
    shortest = int(size["shortest_edge"])
  else:
    resize_hw = hw("size", size)
  try:
    proc = ImageProcessorConfig(
        shortest_edge=shortest, resize_hw=resize_hw, resample=int(d.get("resample", 3)),
        do_resize=bool(d.get("do_resize", True)), do_center_crop=bool(d.get("do_center_crop", True)),
        crop_hw=hw("crop_size", d.get("crop_size", image_size)), do_rescale=bool(d.get("do_rescale", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)), do_normalize=bool(d.get("do_normalize", True)),
        image_mean=tuple(float(x) for x in d.get("image_mean", ImageProcessorConfig.image_mean)),
        image_std=tuple(float(x) for x in d.get("image_std", ImageProcessorConfig.image_std)))
  except ConfigError as e:
    raise ConversionError(f"{path}: {e}") from e
  out = proc.crop_hw if proc.do_center_crop else resize_hw
  if out != (image_size, image_size):
    raise ConversionError(f"{path}: images come out {out} (crop_size / size), but the vision tower takes "
                          f"{image_size}x{image_size} (config.json image_size)")
  return proc


# --- the key map --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """One leaf of our tree and its HF tensor(s)."""
  ours: str                    # "/"-joined path in our module, e.g. "layers/q"
  hf: str                      # HF name (after the tower's prefix); "{i}" = layer index (a stacked leaf)
  kind: str                    # "copy" | "vec" | "probe" | "linear" | "conv"
  n_in: int = 1                # linear: how many leading dims of our (per-layer) shape are nn.Linear's input
  part: Optional[int] = None   # a third of the rows of a packed in_proj (0 q, 1 k, 2 v)
  num_layers: int = 0          # stacked leaves: how many layers ("{i}" in `hf`)

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def hf_names(self, prefix: str) -> List[str]:
    if self.per_layer:
      return [prefix + self.hf.format(i=i) for i in range(self.num_layers)]
    return [prefix + self.hf]


def _layer_rules(ours: str, hf: str, num_layers: int) -> List[Rule]:
  """The encoder layer weights: ours `{ours}q` ... <- HF `{hf}{i}.self_attn.q_proj.weight` ..."""
  rules = [Rule(f"{ours}ln1_scale", f"{hf}{{i}}.layer_norm1.weight", "vec"),
           Rule(f"{ours}ln1_bias", f"{hf}{{i}}.layer_norm1.bias", "vec"),
           Rule(f"{ours}ln2_scale", f"{hf}{{i}}.layer_norm2.weight", "vec"),
           Rule(f"{ours}ln2_bias", f"{hf}{{i}}.layer_norm2.bias", "vec")]
  for name in ("q", "k", "v"):
    rules += [Rule(f"{ours}{name}", f"{hf}{{i}}.self_attn.{name}_proj.weight", "linear"),
              Rule(f"{ours}{name}_bias", f"{hf}{{i}}.self_attn.{name}_proj.bias", "vec")]
  rules += [Rule(f"{ours}o", f"{hf}{{i}}.self_attn.out_proj.weight", "linear", n_in=2),
            Rule(f"{ours}o_bias", f"{hf}{{i}}.self_attn.out_proj.bias", "vec")]
  for name in ("fc1", "fc2"):
    rules += [Rule(f"{ours}{name}", f"{hf}{{i}}.mlp.{name}.weight", "linear"),
              Rule(f"{ours}{name}_bias", f"{hf}{{i}}.mlp.{name}.bias", "vec")]
  return [dataclasses.replace(r, num_layers=num_layers) for r in rules]


def _norm_rules(ours: str, hf: str) -> List[Rule]:
  return [Rule(f"{ours}/scale", f"{hf}.weight", "vec"), Rule(f"{ours}/bias", f"{hf}.bias", "vec")]


def vision_rules(cfg: VisionConfig, ours: str = "") -> List[Rule]:
  """Rules of a vision tower; `ours` prefixes our paths (e.g. "vision/" inside CLIP)."""
  rules = [Rule("patch_embed", PATCH_TENSOR, "conv"),
           Rule("pos_embed", "embeddings.position_embedding.weight", "copy")]
  if cfg.variant == "clip":
    rules += [Rule("class_embed", "embeddings.class_embedding", "vec")] + _norm_rules("pre_norm", "pre_layrnorm")
  else:
    rules += [Rule("patch_bias", "embeddings.patch_embedding.bias", "vec")]
  rules += _layer_rules("layers/", "encoder.layers.", cfg.num_layers) + _norm_rules("post_norm", "post_layernorm")
  if cfg.use_head:
    rules += [Rule("head/probe", "head.probe", "probe")]
    for part, name in enumerate(("q", "k", "v")):
      rules += [Rule(f"head/{name}", "head.attention.in_proj_weight", "linear", part=part),
                Rule(f"head/{name}_bias", "head.attention.in_proj_bias", "vec", part=part)]
    rules += [Rule("head/o", "head.attention.out_proj.weight", "linear", n_in=2),
              Rule("head/o_bias", "head.attention.out_proj.bias", "vec")]
    rules += _norm_rules("head/norm", "head.layernorm")
    for name in ("fc1", "fc2"):
      rules += [Rule(f"head/{name}", f"head.mlp.{name}.weight", "linear"),
                Rule(f"head/{name}_bias", f"head.mlp.{name}.bias", "vec")]
  return [dataclasses.replace(r, ours=ours + r.ours) for r in rules]


def clip_rules(cfg: CLIPConfig) -> List[Rule]:
  """Rules of a CLIPModel (HF names are full names: text_model., vision_model., the projections)."""
  text = [Rule("text/token_embed", "text_model.embeddings.token_embedding.weight", "copy"),
          Rule("text/pos_embed", "text_model.embeddings.position_embedding.weight", "copy")]
  text += _layer_rules("text/layers/", "text_model.encoder.layers.", cfg.text.num_layers)
  text += _norm_rules("text/final_norm", "text_model.final_layer_norm")
  vision = [dataclasses.replace(r, hf="vision_model." + r.hf) for r in vision_rules(cfg.vision, "vision/")]
  top = [Rule("visual_projection", "visual_projection.weight", "linear"),
         Rule("text_projection", "text_projection.weight", "linear"),
         Rule("logit_scale", "logit_scale", "copy")]
  return text + vision + top


def hf_shape(rule: Rule, unit: Tuple[int, ...]) -> Tuple[int, ...]:
  """The HF tensor's shape for our per-layer (unit) shape."""
  if rule.kind == "conv":
    shape = (unit[3], unit[2], unit[0], unit[1])
  elif rule.kind == "linear":
    shape = (math.prod(unit[rule.n_in:]), math.prod(unit[:rule.n_in]))
  elif rule.kind == "vec":
    shape = (math.prod(unit),)
  elif rule.kind == "probe":
    shape = (1, 1) + tuple(unit)
  else:
    shape = tuple(unit)
  return shape if rule.part is None else (3 * shape[0],) + shape[1:]


def to_ours(rule: Rule, a: np.ndarray, unit: Tuple[int, ...]) -> np.ndarray:
  if rule.part is not None:
    n = a.shape[0] // 3
    a = a[rule.part * n:(rule.part + 1) * n]
  if rule.kind == "conv":
    return np.transpose(a, (2, 3, 1, 0))
  if rule.kind == "linear":
    return a.T.reshape(unit)
  return a.reshape(unit)


def to_hf(rule: Rule, ours: np.ndarray) -> np.ndarray:
  """The inverse of to_ours for one unit (per-layer) array; a packed in_proj part gives its third of the rows."""
  unit = ours.shape
  if rule.kind == "conv":
    return np.ascontiguousarray(np.transpose(ours, (3, 2, 0, 1)))
  if rule.kind == "linear":
    return np.ascontiguousarray(ours.reshape(math.prod(unit[:rule.n_in]), -1).T)
  return np.ascontiguousarray(ours.reshape(hf_shape(dataclasses.replace(rule, part=None), unit)))


# --- tensor sources -----------------------------------------------------------------------------------------

class TensorSource:
  """Names, shapes and one-at-a-time reads of HF tensors: a model folder's safetensors (`from_folder`) or an
  in-memory state dict (`from_state_dict`); `where(name)` says which file holds a tensor, for messages."""

  def __init__(self, names: Iterable[str], shape: Callable, read: Callable, where: Callable):
    self._names, self.shape, self.read, self.where = list(names), shape, read, where

  def names(self) -> List[str]:
    return self._names

  @classmethod
  def from_folder(cls, hf_dir) -> "TensorSource":
    ckpt = HFCheckpoint(hf_dir)
    return cls(ckpt.names(), ckpt.shape, ckpt.read,
               lambda n=None: str(ckpt.dir / ckpt.files[n]) if n in ckpt.files else str(ckpt.dir))

  @classmethod
  def from_state_dict(cls, state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> "TensorSource":
    def require(name):
      if name not in state_dict:
        raise ConversionError(f"{source}: tensor {name!r} is missing")
      return np.asarray(state_dict[name])
    return cls(state_dict, lambda n: tuple(require(n).shape), require, lambda n=None: source)


def vision_prefix(src: TensorSource) -> str:
  """The prefix the vision tower's tensors carry ("", "vision_model.", "vision_tower.", ...)."""
  found = sorted(n[:-len(PATCH_TENSOR)] for n in src.names() if n.endswith(PATCH_TENSOR))
  found = [p for p in found if p == "" or p.endswith(("vision_model.", "vision_tower."))]
  if len(found) == 1:
    return found[0]
  if not found:
    raise ConversionError(f"{src.where(None)}: tensor {'vision_model.' + PATCH_TENSOR!r} is missing (looked for "
                          f"'{PATCH_TENSOR}' with no prefix or under vision_model. / vision_tower.): not a CLIP or "
                          f"SigLIP vision tower")
  raise ConversionError(f"{src.where(None)}: several vision towers ({[p + PATCH_TENSOR for p in found]}); "
                        f"cannot tell which to read")


def _read_leaves(src: TensorSource, rules: List[Rule], shapes: Dict[str, Tuple[int, ...]],
                 dtypes: Dict[str, np.dtype], prefix: str) -> Dict[str, np.ndarray]:
  """Checks every rule's tensors (present, shape) first, then reads them: our "/"-path -> array, our layout."""
  for rule in rules:
    want = hf_shape(rule, shapes[rule.ours][1:] if rule.per_layer else shapes[rule.ours])
    for name in rule.hf_names(prefix):
      got = tuple(src.shape(name))
      if got != want:
        raise ConversionError(f"{src.where(name)}: tensor {name!r} has shape {list(got)}, expected {list(want)} "
                              f"(from config.json)")
  out = {}
  for rule in rules:
    unit = shapes[rule.ours][1:] if rule.per_layer else shapes[rule.ours]
    parts = [to_ours(rule, np.asarray(src.read(n), np.float32), unit) for n in rule.hf_names(prefix)]
    out[rule.ours] = (np.stack(parts) if rule.per_layer else parts[0]).astype(dtypes[rule.ours])
  return out


def _abstract(ctor) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, np.dtype]]:
  """Our "/"-path -> (shape, dtype) of every parameter of the module `ctor()` builds, allocating nothing."""
  _, state = abstract_split(ctor)
  flat = {"/".join(str(p) for p in path): v.value for path, v in nnx.to_flat_state(state)}
  return {k: tuple(v.shape) for k, v in flat.items()}, {k: np.dtype(v.dtype) for k, v in flat.items()}


def build_module(ctor, arrays: Mapping[str, np.ndarray]):
  """The module `ctor()` builds, holding `arrays` (our "/"-path -> value; must cover every parameter)."""
  graphdef, state = abstract_split(ctor)
  pure: dict = {}
  for path, value in arrays.items():
    node = pure
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[leaf] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def convert_module(src: TensorSource, ctor, rules: List[Rule], prefix: str, what: str,
                   roots: Tuple[str, ...] = ("",)):
  """The module `ctor()` builds, with every parameter read from `src` by `rules`; every tensor named
  prefix + one of `roots` + ... must be used (IGNORED_SUFFIXES aside; `roots=()` leaves that to the caller)."""
  shapes, dtypes = _abstract(ctor)
  assert {r.ours for r in rules} == set(shapes), sorted({r.ours for r in rules} ^ set(shapes))
  arrays = _read_leaves(src, rules, shapes, dtypes, prefix)
  used = {n for r in rules for n in r.hf_names(prefix)}
  unused = sorted(n for n in src.names() if n.startswith(tuple(prefix + r for r in roots)) and n not in used
                  and not n.endswith(IGNORED_SUFFIXES))
  if unused:
    raise ConversionError(f"{src.where(unused[0])}: unexpected tensor(s) for {what}: {unused[:6]}"
                          f"{' ...' if len(unused) > 6 else ''} (config.json and the weights disagree)")
  return build_module(ctor, arrays)


# --- public: vision towers ----------------------------------------------------------------------------------

def vision_tower_from_tensors(cfg: VisionConfig, src: TensorSource) -> VisionTower:
  """The vision tower `cfg` describes, read from `src` under whichever prefix it uses (see `vision_prefix`)."""
  prefix = vision_prefix(src)
  return convert_module(src, lambda: VisionTower(cfg, rngs=nnx.Rngs(0)), vision_rules(cfg), prefix,
                        f"a {cfg.variant} vision tower (tensors {prefix + '*'!r})", VISION_ROOTS)


def vision_tower_from_state_dict(cfg: VisionConfig, state_dict: Mapping[str, np.ndarray],
                                 source: str = "state dict") -> VisionTower:
  """A HF CLIPVisionModel / SiglipVisionModel state dict (numpy arrays; any of the prefixes above, e.g. the
  `vision_tower.` tensors of a LLaVA checkpoint) -> VisionTower."""
  return vision_tower_from_tensors(cfg, TensorSource.from_state_dict(state_dict, source))


def load_hf_vision_tower(hf_dir) -> Tuple[VisionConfig, VisionTower]:
  """A HF folder (config.json + safetensors) holding a CLIP / SigLIP vision tower -> (VisionConfig, module)."""
  hf_dir = epath.Path(hf_dir)
  config_path = hf_dir / CONFIG_FILE
  cfg = vision_config_from_hf(read_json(config_path, "a Hugging Face config.json"), str(config_path))
  return cfg, vision_tower_from_tensors(cfg, TensorSource.from_folder(hf_dir))


# --- public: CLIP -------------------------------------------------------------------------------------------

def load_hf_clip(hf_dir) -> Tuple[CLIPConfig, CLIP]:
  """A HF CLIPModel folder (config.json + safetensors) -> (CLIPConfig, Flax CLIP), float32."""
  hf_dir = epath.Path(hf_dir)
  if not hf_dir.is_dir():
    raise ConversionError(f"{hf_dir}: not a directory (expected a Hugging Face CLIPModel folder)")
  config_path = hf_dir / CONFIG_FILE
  cfg = clip_config_from_hf(read_json(config_path, "a Hugging Face CLIPModel config.json"), str(config_path))
  src = TensorSource.from_folder(hf_dir)
  model = convert_module(src, lambda: CLIP(cfg, rngs=nnx.Rngs(0)), clip_rules(cfg), "", "a CLIPModel")
  return cfg, model
