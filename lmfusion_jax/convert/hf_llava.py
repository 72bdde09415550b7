"""Hugging Face LLaVA / LLaVA-NeXT folders (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`:
config.json + safetensors + preprocessor_config.json) -> LlavaConfig, our `text` tree and the LlavaVision module.

The tensor names are data, usable in both directions (a streaming convert-llava, a bitwise export-llava):
  text     hf_llama's TensorRules, renamed into the folder ("model.layers.{i}..." -> LAYOUT.text + "layers.{i}...",
           "lm_head.weight" -> LAYOUT.lm_head): `text_rules(cfg)`
  vision   hf_clip's Rules of the tower (ours "tower/...") + the projector and image_newline, full HF names:
           `vision_rules(cfg)`
A folder spells the names one of two ways (LAYOUTS); the one read is recorded in LlavaConfig.hf_layout:
  "saved"   what transformers 5 save_pretrained writes (and older hub checkpoints hold): language_model.model.*,
            language_model.lm_head.weight, vision_tower.*, multi_modal_projector.*, image_newline
  "module"  transformers 5's module names: model.language_model.*, lm_head.weight, model.vision_tower.*,
            model.multi_modal_projector.*, model.image_newline
and either may put the tower one level deeper, under "vision_model." (older hub checkpoints): "+vision_model".
Every tensor of the folder must be used (a rotary inv_freq / position_ids buffer aside), and every one needed must
be there with the shape config.json implies: else ConversionError naming the tensor and the file.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from etils import epath
from flax import nnx

from lmfusion_jax.checkpoints.vae import read_json
from lmfusion_jax.convert import hf_clip, hf_export, hf_llama
from lmfusion_jax.convert.hf_clip import Rule, TensorSource
from lmfusion_jax.convert.hf_llama import ConversionError, HFCheckpoint, TensorRule
from lmfusion_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessorConfig
from lmfusion_jax.models.config import ConfigError, LlamaConfig
from lmfusion_jax.models.llava import LlavaConfig, LlavaVision
from lmfusion_jax.models.params import abstract_split

__all__ = ["LAYOUTS", "Layout", "LlavaConfig", "detect_layout", "layout_of", "load_hf_llava", "read_llava_config",
           "llava_config_to_hf", "processor_to_hf", "text_rules", "validate", "vision_param_shapes",
           "vision_rules"]

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_TYPES = {"llava": False, "llava_next": True}          # model_type -> NeXT
IGNORED_SUFFIXES = hf_llama.IGNORED_SUFFIXES + hf_clip.IGNORED_SUFFIXES
NESTED = "+vision_model"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Full HF name prefixes of a LLaVA folder's parts."""
  text: str        # the Llama body (embed_tokens, layers, norm)
  lm_head: str     # the LM head tensor's full name
  tower: str       # the vision tower (then embeddings., encoder., ...)
  top: str         # multi_modal_projector.* and image_newline


LAYOUTS = {
    "saved": Layout("language_model.model.", "language_model.lm_head.weight", "vision_tower.", ""),
    "module": Layout("model.language_model.", "lm_head.weight", "model.vision_tower.", "model."),
}
# HF defaults for what an older config.json may leave out (LlamaConfig; LlavaConfig's default CLIP tower).
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6)
LLAVA_VISION_DEFAULT = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                            patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16)
# HF image processors (PIL backend) and their class defaults: (size, crop, center crop, mean, std, do_pad).
PROCESSORS = {
    "CLIPImageProcessor": ({"shortest_edge": 224}, 224, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False),
    "LlavaImageProcessor": ({"shortest_edge": 224}, 224, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False),
    "SiglipImageProcessor": ({"height": 224, "width": 224}, 224, False, (0.5,) * 3, (0.5,) * 3, False),
    "LlavaNextImageProcessor": ({"shortest_edge": 224}, 224, True, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False),
}


def layout_of(name: str) -> Layout:
  """The Layout of a LlavaConfig.hf_layout name ("saved", "module", either + "+vision_model")."""
  base, nested = (name[:-len(NESTED)], True) if name.endswith(NESTED) else (name, False)
  if base not in LAYOUTS:
    raise ConfigError(f"hf_layout={name!r}: expected one of {sorted(LAYOUTS)} (optionally + {NESTED!r})")
  lay = LAYOUTS[base]
  return dataclasses.replace(lay, tower=lay.tower + "vision_model.") if nested else lay


def detect_layout(names, where: str) -> str:
  """The layout name of a folder holding tensors `names` (found by the embedding and patch tensors)."""
  names = set(names)
  found = [b for b, lay in LAYOUTS.items() if lay.text + "embed_tokens.weight" in names]
  if len(found) != 1:
    wanted = [lay.text + "embed_tokens.weight" for lay in LAYOUTS.values()]
    raise ConversionError(f"{where}: {'none' if not found else 'both'} of the text embeddings {wanted} "
                          f"{'is' if not found else 'are'} present: not a LLaVA checkpoint (or a mixed one)")
  lay = LAYOUTS[found[0]]
  nested = lay.tower + "vision_model." + hf_clip.PATCH_TENSOR in names
  return found[0] + (NESTED if nested else "")


# --- the key map --------------------------------------------------------------------------------------------

def text_rules(cfg: LlavaConfig) -> Tuple[TensorRule, ...]:
  """hf_llama's rules of the Llama, with the folder's full names."""
  lay = layout_of(cfg.hf_layout)

  def rename(hf: str) -> str:
    return lay.lm_head if hf == "lm_head.weight" else lay.text + hf[len("model."):]

  return tuple(dataclasses.replace(r, hf=rename(r.hf)) for r in hf_llama.text_rules(cfg.text))


def vision_rules(cfg: LlavaConfig) -> List[Rule]:
  """Rules of LlavaVision (ours "tower/...", "projector/...", "image_newline"), with full HF names."""
  lay = layout_of(cfg.hf_layout)
  rules = [dataclasses.replace(r, hf=lay.tower + r.hf) for r in hf_clip.vision_rules(cfg.vision, "tower/")]
  proj = lay.top + "multi_modal_projector."
  for name in ("linear_1", "linear_2"):
    rules.append(Rule(f"projector/{name}", f"{proj}{name}.weight", "linear"))
    if cfg.projector_bias:
      rules.append(Rule(f"projector/{name}_bias", f"{proj}{name}.bias", "vec"))
  if cfg.is_next:
    rules.append(Rule("image_newline", lay.top + "image_newline", "copy"))
  return rules


# --- configs ------------------------------------------------------------------------------------------------

def _text_config(d: dict, source: str) -> LlamaConfig:
  t = dict(d.get("text_config") or {})
  source = f"{source} (text_config)"
  if t.get("model_type", "llama") != "llama":
    raise ConversionError(f"{source}: field 'model_type'={t['model_type']!r}; only a Llama language model "
                          f"is supported")
  t = {**LLAMA_DEFAULTS, **t}
  t["tie_word_embeddings"] = bool(d.get("tie_word_embeddings") or t.get("tie_word_embeddings"))
  try:
    return LlamaConfig.from_hf_dict(t, source)
  except ConfigError as e:
    raise ConversionError(str(e)) from e


def _hw(value, field: str, source: str) -> Tuple[int, int]:
  if isinstance(value, int) and not isinstance(value, bool):
    return value, value
  if isinstance(value, dict) and {"height", "width"} <= set(value):
    return int(value["height"]), int(value["width"])
  raise ConversionError(f"{source}: field {field!r}={value!r}: expected an int or {{'height', 'width'}}")


def processor_from_hf(d: Optional[dict], cfg: LlavaConfig, source: str) -> LlavaConfig:
  """`cfg` with the image processor of a preprocessor_config.json dict (None: the processor class's defaults
  at the tower's size). The processed tile must be the tower's image_size square."""
  size_px = cfg.vision.image_size
  default_kind = ("LlavaNextImageProcessor" if cfg.is_next else
                  "SiglipImageProcessor" if cfg.vision.variant == "siglip" else "CLIPImageProcessor")
  if d is None:
    d = {"image_processor_type": default_kind,
         "size": {"height": size_px, "width": size_px} if cfg.vision.variant == "siglip" and not cfg.is_next
         else {"shortest_edge": size_px}, "crop_size": size_px}
  kind = str(d.get("image_processor_type", default_kind)).removesuffix("Pil").removesuffix("Fast")
  if kind not in PROCESSORS or (kind == "LlavaNextImageProcessor") != cfg.is_next:
    want = ["LlavaNextImageProcessor"] if cfg.is_next else sorted(set(PROCESSORS) - {"LlavaNextImageProcessor"})
    raise ConversionError(f"{source}: field 'image_processor_type'={kind!r}; a "
                          f"{'LLaVA-NeXT' if cfg.is_next else 'LLaVA'} model needs one of {want}")
  size, crop, do_crop, mean, std, do_pad = PROCESSORS[kind]
  size = d.get("size", size)
  shortest, resize_hw = None, None
  if isinstance(size, int) or (isinstance(size, dict) and "shortest_edge" in size):
    shortest = int(size if isinstance(size, int) else size["shortest_edge"])
  else:
    resize_hw = _hw(size, "size", source)
  try:
    proc = ImageProcessorConfig(
        shortest_edge=shortest, resize_hw=resize_hw, resample=int(d.get("resample", 3)),
        do_resize=bool(d.get("do_resize", True)), do_center_crop=bool(d.get("do_center_crop", do_crop)),
        crop_hw=_hw(d.get("crop_size", crop), "crop_size", source), do_rescale=bool(d.get("do_rescale", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)), do_normalize=bool(d.get("do_normalize", True)),
        image_mean=tuple(float(x) for x in d.get("image_mean", mean)),
        image_std=tuple(float(x) for x in d.get("image_std", std)))
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from e
  out = proc.crop_hw if proc.do_center_crop else (resize_hw or (shortest, shortest))
  if not proc.do_resize or out != (size_px, size_px):
    raise ConversionError(f"{source}: tiles come out {out} (size / crop_size), but the vision tower takes "
                          f"{size_px}x{size_px} (config.json vision_config.image_size)")
  pins = d.get("image_grid_pinpoints")
  if cfg.is_next and pins is not None and [list(p) for p in pins] != [list(p) for p in cfg.image_grid_pinpoints]:
    raise ConversionError(f"{source}: field 'image_grid_pinpoints'={pins} differs from config.json's "
                          f"{[list(p) for p in cfg.image_grid_pinpoints]}")
  pad = bool(d.get("do_pad", do_pad)) and kind == "LlavaImageProcessor"
  return cfg.replace(processor=proc, pad_to_square=pad)


def llava_config_from_hf(d: dict, source: str = CONFIG_FILE, hf_layout: str = "saved") -> LlavaConfig:
  """LlavaConfig from a HF LLaVA / LLaVA-NeXT config.json dict (image processor: the defaults; see
  processor_from_hf). A field we cannot reproduce raises ConversionError naming it."""
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"{source}: model_type is {model_type!r}; expected one of {sorted(MODEL_TYPES)} "
                          f"(a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration folder)")
  is_next = MODEL_TYPES[model_type]
  vd = d.get("vision_config") or LLAVA_VISION_DEFAULT
  vision = hf_clip.vision_config_from_hf({"vision_config": vd}, source)
  layer = d.get("vision_feature_layer", -2)
  if not isinstance(layer, int) or isinstance(layer, bool):
    raise ConversionError(f"{source}: field 'vision_feature_layer'={layer!r}: only a single layer (an int) is "
                          f"supported (HF also allows a list of layers, concatenated: not reproduced here)")
  pins = d.get("image_grid_pinpoints") if is_next else None
  if is_next and pins is None:
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]      # LlavaNextConfig's default
  if pins is not None and not (isinstance(pins, list) and pins and
                               all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pins)):
    raise ConversionError(f"{source}: field 'image_grid_pinpoints'={pins!r}: expected a list of [height, width]")
  token = d.get("image_token_index", d.get("image_token_id", 32000))
  text = _text_config(d, source)
  try:
    cfg = LlavaConfig(
        text=text, vision=vision, processor=ImageProcessorConfig.default_for(vision.image_size),
        image_grid_pinpoints=tuple(tuple(p) for p in pins or ()), vision_feature_layer=layer,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        projector_bias=bool(d.get("multimodal_projector_bias", True)), image_token_index=token,
        hf_layout=hf_layout)
  except ConfigError as e:
    raise ConversionError(f"{source}: {e}") from e
  return processor_from_hf(None, cfg, source)


def read_llava_config(hf_dir, hf_layout: str = "saved") -> LlavaConfig:
  """LlavaConfig from hf_dir/config.json and hf_dir/preprocessor_config.json (the processor class's defaults
  at the tower's size when the folder has none)."""
  hf_dir = epath.Path(hf_dir)
  path = hf_dir / CONFIG_FILE
  cfg = llava_config_from_hf(read_json(path, "a Hugging Face LLaVA config.json"), str(path), hf_layout)
  pre = hf_dir / PREPROCESSOR_FILE
  return processor_from_hf(read_json(pre, "the image processor's config") if pre.exists() else None, cfg, str(pre))


def llava_config_to_hf(cfg: LlavaConfig) -> dict:
  """config.json of a plain LLaVA (`LlavaForConditionalGeneration`) for `cfg`: the inverse of llava_config_from_hf
  (text_config a Llama, vision_config a CLIP / SigLIP vision model). NeXT is not written."""
  if cfg.is_next:
    raise ConfigError("llava_config_to_hf: writes plain LLaVA configs only (this one has image_grid_pinpoints)")
  v = cfg.vision
  text = {k: x for k, x in hf_export.hf_config_dict(cfg.text, cfg.text.param_dtype).items() if k != "architectures"}
  vision = {"model_type": {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[v.variant],
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act}
  if v.variant == "siglip":
    vision["vision_use_head"] = v.use_head
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
          "vision_config": vision, "image_token_index": cfg.image_token_index,
          "projector_hidden_act": cfg.projector_hidden_act, "multimodal_projector_bias": cfg.projector_bias,
          "vision_feature_layer": cfg.vision_feature_layer,
          "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
          "tie_word_embeddings": cfg.text.tie_embeddings, "dtype": cfg.text.param_dtype}


def processor_to_hf(cfg: LlavaConfig) -> dict:
  """preprocessor_config.json of cfg.processor: a CLIPImageProcessor (SiglipImageProcessor for a SigLIP tower);
  processor_from_hf reads it back to the same ImageProcessorConfig."""
  p = cfg.processor
  kind = "SiglipImageProcessor" if cfg.vision.variant == "siglip" else "CLIPImageProcessor"
  size = {"shortest_edge": p.shortest_edge} if p.shortest_edge is not None else \
      {"height": p.resize_hw[0], "width": p.resize_hw[1]}
  return {"image_processor_type": kind, "do_resize": p.do_resize, "size": size, "resample": p.resample,
          "do_center_crop": p.do_center_crop, "crop_size": {"height": p.crop_hw[0], "width": p.crop_hw[1]},
          "do_rescale": p.do_rescale, "rescale_factor": p.rescale_factor, "do_normalize": p.do_normalize,
          "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_convert_rgb": True}


# --- reading ------------------------------------------------------------------------------------------------

def vision_param_shapes(cfg: LlavaConfig) -> Dict[str, Tuple[int, ...]]:
  """Our LlavaVision leaves ("/"-path -> shape), allocating nothing."""
  _, state = abstract_split(lambda: LlavaVision(cfg, rngs=nnx.Rngs(0)))
  return {"/".join(str(p) for p in path): tuple(v.value.shape) for path, v in nnx.to_flat_state(state)}


def validate(ckpt: HFCheckpoint, cfg: LlavaConfig) -> None:
  """Before anything is read: every tensor the model needs is present with the shape config.json implies, and
  no tensor is left over. ConversionError names the tensor and the file."""
  expected = hf_llama.check_tensors(ckpt, cfg.text, text_rules(cfg))
  shapes = vision_param_shapes(cfg)
  for rule in vision_rules(cfg):
    want = hf_clip.hf_shape(rule, shapes[rule.ours][1:] if rule.per_layer else shapes[rule.ours])
    for name in rule.hf_names(""):
      got = ckpt.shape(name)                                             # raises when missing, naming the files
      if got != want:
        raise ConversionError(f"{ckpt.dir / ckpt.files[name]}: tensor {name!r} has shape {list(got)}, expected "
                              f"{list(want)} (from config.json)")
      expected.add(name)
  lm_head = layout_of(cfg.hf_layout).lm_head
  unknown = sorted(n for n in ckpt.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                   and not (cfg.text.tie_embeddings and n == lm_head))
  if unknown:
    raise ConversionError(f"{ckpt.dir / ckpt.files[unknown[0]]}: unexpected tensor(s) for a "
                          f"{'LLaVA-NeXT' if cfg.is_next else 'LLaVA'} model: {unknown[:6]}"
                          f"{' ...' if len(unknown) > 6 else ''} (config.json and the weights disagree)")


def load_hf_llava(hf_dir, dtype: Optional[str] = None) -> Tuple[LlavaConfig, dict, LlavaVision]:
  """A HF LLaVA / LLaVA-NeXT folder -> (LlavaConfig, `text` pure dict of numpy arrays (as
  hf_llama.load_hf_text_params gives; in `dtype`, default the checkpoint's), LlavaVision (float32)).
  Holds the model in memory."""
  ckpt = HFCheckpoint(hf_dir)
  cfg = read_llava_config(hf_dir, detect_layout(ckpt.names(), str(ckpt.dir)))
  validate(ckpt, cfg)
  rules = text_rules(cfg)
  dtype = dtype or hf_llama.checkpoint_dtype(ckpt, cfg.text, rules)
  cfg = cfg.replace(text=cfg.text.replace(param_dtype=dtype))
  text = hf_llama.nest(dict(hf_llama.iter_text_leaves(ckpt, cfg.text, dtype, rules)))
  vision = hf_clip.convert_module(TensorSource.from_folder(hf_dir), lambda: LlavaVision(cfg, rngs=nnx.Rngs(0)),
                                  vision_rules(cfg), "", "the vision side", roots=())
  return cfg, text, vision
