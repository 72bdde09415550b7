"""What `generate --image` and `caption` do with a LLaVA checkpoint (the understanding path, inference/llava_generate):
image files + prompt texts -> new tokens and text.

Each prompt is tokenized with the checkpoint's tokenizer and must hold the image token (`<image>`, id
image_token_index) once per image it refers to; the images are taken in order across the prompts, each expanded to
the number of tokens its size needs (LLaVA-NeXT: depends on the size), as HF's LlavaProcessor /
LlavaNextProcessor do. Greedy by default: the same tokens as HF `generate(do_sample=False)`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

from lmfusion_jax.errors import UserError

DEFAULT_CAPTION_PROMPT = "<image>\nDescribe the image."


class Answer(NamedTuple):
  prompt: str
  tokens: List[int]
  text: str


def load_tokenizer_for(checkpoint, override=None):
  """The tokenizer: `override`, else the HF folder's own, else the one that travels with the checkpoint / run."""
  from lmfusion_jax.checkpoints.params import has_tokenizer
  from lmfusion_jax.data.tokenizer import load_tokenizer
  if override:
    return load_tokenizer(override)
  if has_tokenizer(checkpoint):
    return load_tokenizer(checkpoint)
  from lmfusion_jax.inference import loading
  found = loading.checkpoint_tokenizer(checkpoint)
  if not found:
    raise UserError(f"--checkpoint {checkpoint}: no tokenizer travels with it; pass --tokenizer DIR")
  return load_tokenizer(found)


def read_image(path):
  """An image file -> its PIL image, loaded (UserError naming the file when it cannot be read); preprocess turns
  it into RGB as HF's processors do."""
  from PIL import Image
  try:
    img = Image.open(path)
    img.load()
  except Exception as e:  # PIL raises several types for unreadable files
    raise UserError(f"--image {path}: cannot read the image ({type(e).__name__}: {e})") from e
  return img


def answer(llava, tokenizer, image_files: Sequence[str], prompts: Sequence[str], max_new_tokens: int, *,
           add_bos: bool = True, ignore_eos: bool = False, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0) -> List[Answer]:
  from lmfusion_jax.inference import llava_generate as gen
  from lmfusion_jax.inference import llava_preprocess as pre
  cfg = llava.cfg
  ids = [list(tokenizer(p, add_special_tokens=add_bos)["input_ids"]) for p in prompts]
  wants = [sum(t == cfg.image_token_index for t in x) for x in ids]
  if sum(wants) != len(image_files):
    raise UserError(f"the prompts hold {sum(wants)} image token(s) (id {cfg.image_token_index}, "
                    f"{tokenizer.convert_ids_to_tokens(cfg.image_token_index)!r}) for {len(image_files)} --image "
                    f"file(s); put one image token in a prompt where each image goes")
  pixels = [pre.preprocess(cfg, read_image(f)) for f in image_files]
  expanded, k = [], 0
  for x, n in zip(ids, wants):
    expanded.append(pre.expand_image_tokens(x, cfg, [p.num_tokens for p in pixels[k:k + n]]))
    k += n
  longest = max(len(x) for x in expanded)
  if longest + max_new_tokens > cfg.text.max_seq_len:
    raise UserError(f"a prompt of {longest} tokens (images expanded) + --max-new-tokens {max_new_tokens} exceeds "
                    f"the model's max_seq_len={cfg.text.max_seq_len}")
  eos = () if ignore_eos else tuple(sorted({cfg.text.eos_id} | ({tokenizer.eos_token_id}
                                                                 if tokenizer.eos_token_id is not None else set())))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id not in (None, cfg.image_token_index) else 0
  new = gen.generate(llava, pixels, expanded, max_new_tokens, eos_ids=eos, pad_id=pad, temperature=temperature,
                     top_p=top_p, seed=seed)
  return [Answer(p, t, tokenizer.decode(t, skip_special_tokens=True)) for p, t in zip(prompts, new)]
