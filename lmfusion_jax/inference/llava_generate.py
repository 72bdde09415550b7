"""Text generation from images + a prompt with a LLaVA / LLaVA-NeXT model: our Llama on the embedded sequence.

  llava = load_llava(hf_dir)                                   # Llava(cfg, text: Llama, vision: LlavaVision)
  pix = [llava_preprocess.preprocess(llava.cfg, image)]        # tiles + how many image tokens the image takes
  prompt = llava_preprocess.expand_image_tokens(ids, llava.cfg, [p.num_tokens for p in pix])
  generate(llava, pix, [prompt], max_new_tokens=32)            # greedy: HF generate(do_sample=False)

The images' rows (models/llava.image_rows) replace the embeddings of the prompts' image tokens in row-major order
(the k-th image token across the left-padded batch takes row k, as HF's masked_scatter), the prompts are
prefilled into a KV cache through the text weights with the causal mask (Llama.forward_embedded), and the new
tokens are decoded by the one decode loop (inference/sampler.py): after the prompt everything is text.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from lmfusion_jax.errors import UserError
from lmfusion_jax.inference.llava_preprocess import PixelInputs
from lmfusion_jax.inference.sampler import Sampler, left_pad, trim_at_eos
from lmfusion_jax.models import decoder, sharded
from lmfusion_jax.models.llama import Llama
from lmfusion_jax.models.llava import (LlavaConfig, LlavaVision, check_image_token_count, image_rows,
                                       place_image_features)
from lmfusion_jax.models.mask import text_info


class Llava(NamedTuple):
  cfg: LlavaConfig
  text: Llama
  vision: LlavaVision


def llava_source(checkpoint) -> Optional[str]:
  """Where the vision side of `checkpoint` lives: the checkpoint itself (a HF LLaVA folder, or a params checkpoint
  from convert-llava), a training run's init_from when that is a LLaVA checkpoint (LLaVAFusion: text and vision
  never change), else None (a plain Llama / LMFusion checkpoint)."""
  from lmfusion_jax.checkpoints import llava as llava_ckpt
  from lmfusion_jax.checkpoints import params as params_io
  from lmfusion_jax.checkpoints.resolve import resolve, run_record
  path = epath.Path(checkpoint)
  if (path / "config.json").exists() and not (path / params_io.CONFIG_FILE).exists():   # a HF folder
    from lmfusion_jax.checkpoints.vae import read_json
    from lmfusion_jax.convert.hf_llava import MODEL_TYPES
    return str(path) if read_json(path / "config.json", "a HF config.json").get("model_type") in MODEL_TYPES else None
  kind, path, _ = resolve(checkpoint)
  if kind == "params":
    return str(path) if llava_ckpt.is_llava(path) else None
  init = (run_record(path).get("config") or {}).get("init_from") or ""
  return init if init and (epath.Path(init) / params_io.CONFIG_FILE).exists() and llava_ckpt.is_llava(init) \
      else None


def load_llava(checkpoint, dtype: Optional[str] = None) -> Llava:
  """A HF LLaVA / LLaVA-NeXT folder (convert/hf_llava.load_hf_llava), a LLaVA params checkpoint (convert-llava: its
  text and vision parts) or a LLaVAFusion training run / step (its text; the vision of its init_from) as a Llava,
  held in memory."""
  from lmfusion_jax.checkpoints import llava as llava_ckpt
  from lmfusion_jax.checkpoints import params as params_io
  source = llava_source(checkpoint)
  if source is None:
    raise UserError(f"{checkpoint}: not a LLaVA checkpoint (a HF LLaVA / LLaVA-NeXT folder, a convert-llava "
                    f"checkpoint, or a training run whose init_from is one)")
  if not (epath.Path(source) / params_io.CONFIG_FILE).exists():
    from lmfusion_jax.convert.hf_llava import load_hf_llava
    cfg, text_params, vision = load_hf_llava(source, dtype)
    return Llava(cfg, sharded.model(cfg.text, None, {"text": text_params}), vision)
  from lmfusion_jax.inference import loading
  cfg = llava_ckpt.read_llava(source)
  text_cfg, text_params = loading.load_text(checkpoint, dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaVision(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params_io.load_params(source, subtree="vision"))
  cfg = cfg.replace(text=text_cfg)
  return Llava(cfg, sharded.model(text_cfg, None, {"text": text_params}), nnx.merge(graphdef, state))


@functools.lru_cache(maxsize=8)
def _vision_fn(graphdef):
  return jax.jit(lambda state, tiles: nnx.merge(graphdef, state)(tiles))


def images_rows(vision: LlavaVision, images: Sequence[PixelInputs]) -> jax.Array:
  """The rows of every image, in order, concatenated: [sum of num_tokens, D]."""
  graphdef, state = nnx.split(vision)
  fn, cfg = _vision_fn(graphdef), vision.cfg
  newline = vision.image_newline[...] if cfg.is_next else None
  rows = [image_rows(cfg, fn(state, jnp.asarray(pix.tiles)), pix.image_hw, newline) for pix in images]
  return jnp.concatenate(rows, axis=0) if rows else jnp.zeros((0, cfg.text.dim), jnp.float32)


def _embedded(model: Llama, tokens, rows, image_token: int):
  return place_image_features(model.embed_tokens(tokens), tokens, rows, image_token)      # [B, P, D]


@functools.partial(jax.jit, static_argnames=("graphdef", "image_token"))
def _logits(graphdef, state, tokens, segment_ids, positions, rows, image_token: int):
  model = nnx.merge(graphdef, state)
  logits, _ = model.forward_embedded(_embedded(model, tokens, rows, image_token), positions, segment_ids)
  return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "image_token", "cache_len"))
def _prefill(graphdef, state, tokens, segment_ids, positions, rows, image_token: int, cache_len: int):
  """Prompts [B, P] with image rows placed -> (last logits [B, V], cache of `cache_len` slots)."""
  model = nnx.merge(graphdef, state)
  logits, (k, v) = model.forward_embedded(_embedded(model, tokens, rows, image_token), positions, segment_ids)
  cache = decoder.empty_cache(model.cfg, tokens.shape[0], cache_len)
  cache = decoder.write_cache(cache, k, v, text_info(positions, segment_ids), 0)
  return logits[:, -1], cache


def _inputs(llava: Llava, images: Sequence[PixelInputs], prompts: Sequence[Sequence[int]], pad_id: int):
  tokens, segs, pos = left_pad(prompts, pad_id)
  if pad_id == llava.cfg.image_token_index and (segs == 0).any():
    raise UserError(f"pad_id={pad_id} is the image token; pick another padding id")
  rows = images_rows(llava.vision, images)
  check_image_token_count(tokens, llava.cfg.image_token_index, rows.shape[0])
  return jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(pos), rows


def prompt_logits(llava: Llava, images: Sequence[PixelInputs], prompts: Sequence[Sequence[int]],
                  pad_id: int = 0) -> jax.Array:
  """fp32 logits [B, P, V] of the left-padded prompts with the images' rows at their image tokens."""
  tokens, segs, pos, rows = _inputs(llava, images, prompts, pad_id)
  return _logits(*nnx.split(llava.text), tokens, segs, pos, rows, image_token=llava.cfg.image_token_index)


def generate(llava: Llava, images: Sequence[PixelInputs], prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> List[List[int]]:
  """New token ids per prompt (greedy when temperature == 0). `images` are in the order their image tokens
  appear across the prompts; each prompt holds its images' expanded image tokens (expand_image_tokens).
  A row stops after its first token in `eos_ids` (None: the text config's eos_id; (): never)."""
  if max_new_tokens < 1:
    raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  cfg = llava.cfg.text
  p = max((len(x) for x in prompts), default=0)
  if p + max_new_tokens > cfg.max_seq_len:
    raise UserError(f"generate: prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                    f"{cfg.max_seq_len}")
  tokens, segs, pos, rows = _inputs(llava, images, prompts, pad_id)
  sampler = Sampler(llava.text)
  logits, cache = _prefill(*nnx.split(llava.text), tokens, segs, pos, rows,
                           image_token=llava.cfg.image_token_index, cache_len=p + max_new_tokens)
  eos = [cfg.eos_id] if eos_ids is None else list(eos_ids)
  out = sampler.decode(logits, cache, np.asarray([len(x) for x in prompts]), p, max_new_tokens, eos_ids=eos,
                       pad_id=pad_id, temperature=temperature, top_p=top_p, seed=seed)
  return trim_at_eos(out, eos)
