"""Tiny random Hugging Face LLaVA / LLaVA-NeXT models (CLIP or SigLIP tower) saved as folders with a
preprocessor_config.json: the independent reference of tests/test_llava_parity.py.

Weights are drawn wide (clip_models.randomize: norm weights around 1, biases non-zero), so a mapping error cannot
hide below the tolerance; the vocabulary is small (96, image token 95) and the tower takes 16 px images in 4 px
patches (16 tokens per tile), so a NeXT image is a few hundred tokens at most."""
import torch
import transformers

from clip_models import MEAN, STD, randomize, vision_kw

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
TILE = 16
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
VARIANTS = ("llava-clip", "llava-siglip", "next-clip", "next-siglip")


def text_kw(vocab=VOCAB):
  return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def _vision(tower: str) -> dict:
  kind = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[tower]
  return dict(vision_kw(image_size=TILE, patch_size=4), model_type=kind)


def _processor(kind: str, tower: str):
  if kind == "next":
    size = {"shortest_edge": TILE} if tower == "clip" else {"height": TILE, "width": TILE}
    return transformers.LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS, size=size,
                                                crop_size={"height": TILE, "width": TILE},
                                                do_center_crop=tower == "clip", image_mean=MEAN, image_std=STD)
  if tower == "siglip":
    return transformers.SiglipImageProcessor(size={"height": TILE, "width": TILE}, image_mean=MEAN, image_std=STD)
  return transformers.CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                         image_mean=MEAN, image_std=STD)


def make_hf_llava(folder, variant: str, seed: int = 0, vocab: int = VOCAB, image_token: int = IMAGE_TOKEN):
  """A random LLaVA ("llava-*") or LLaVA-NeXT ("next-*") with a CLIP or SigLIP tower, saved at `folder`
  (config.json, model.safetensors, preprocessor_config.json). Returns the torch model (eval, float32).

  CLIP towers use vision_feature_select_strategy "default" (CLS dropped), SigLIP towers "full"."""
  kind, tower = variant.split("-")
  torch.manual_seed(seed)
  kw = dict(text_config=text_kw(vocab), vision_config=_vision(tower), image_token_index=image_token,
            vision_feature_layer=-2, vision_feature_select_strategy="default" if tower == "clip" else "full")
  if kind == "next":
    config, cls = transformers.LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **kw), \
        transformers.LlavaNextForConditionalGeneration
  else:
    config, cls = transformers.LlavaConfig(**kw), transformers.LlavaForConditionalGeneration
  model = randomize(cls(config), seed).eval()
  model.generation_config.eos_token_id = None       # all max_new_tokens are produced, none suppressed
  model.generation_config.pad_token_id = 0
  model.save_pretrained(str(folder), safe_serialization=True)
  _processor(kind, tower).save_pretrained(str(folder))
  return model


def make_hf_llava_with_tokenizer(folder, variant: str, seed: int = 0):
  """make_hf_llava with a byte-level BPE tokenizer saved beside it whose last id is the `<image>` token (the
  model's image_token_index), as HF LLaVA folders hold. Returns (torch model, tokenizer)."""
  from lmfusion_jax.data.tokenizer import train_tokenizer
  texts = ["a photo of a cat on a mat", "what is in the image", "describe the image", "USER: ASSISTANT:"] * 20
  tok = train_tokenizer(texts, 300, str(folder) + ".tok")
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  image_token = tok.convert_tokens_to_ids("<image>")
  assert image_token == len(tok) - 1
  model = make_hf_llava(folder, variant, seed, vocab=len(tok), image_token=image_token)
  tok.save_pretrained(str(folder))
  return model, tok
