r"""LLaVAFusion on LLaVA-NeXT-8B (the paper's second setting, Table 2): the VLM (`llava-hf/llama3-llava-next-8b-hf`:
Llama-3-8B-Instruct with a 128,320-token vocabulary + CLIP ViT-L/14-336 + projector) stays frozen, and the image
generation branch (copies of the text layers + the U-Net) trains with LMFusion's data and settings: the same
shapes, optimizer and mesh presets as configs/llama3_8b_lmfusion.py.

  lmfusion-jax convert-llava --hf-dir llama3-llava-next-8b-hf --out gs://BUCKET/llava_next_8b_fusion_init
  lmfusion-jax plan  --config configs/llava_next_8b_fusion.py:v5p-128 --topology v5p-128
  lmfusion-jax train --config configs/llava_next_8b_fusion.py:v5p-128 --config.workdir=gs://BUCKET/run \
      --config.init_from=gs://BUCKET/llava_next_8b_fusion_init --config.data.data_dir=gs://BUCKET/tfds
  lmfusion-jax caption --checkpoint gs://BUCKET/run --image cat.jpg     # understanding: the VLM's, unchanged
  lmfusion-jax sample  --checkpoint gs://BUCKET/run --prompt "a cat"    # generation: the new branch

The train step is LMFusion's on the VLM's Llama: caption-first (generation) and image-first (understanding through
VAE latents) documents, text frozen. The vision side (0.30B tower + 0.02B projector + image_newline) is stored in
the checkpoint but never loaded by training: it has no gradient, no optimizer state and no HBM in the step; the
`caption` / `generate --image` commands read it from the run's init_from. The tokenizer travels with the converted
checkpoint (the VLM's; BOI/EOI = its <|reserved_special_token_0|> / _1|>, untrained in the VLM as in Llama-3).
"""
import pathlib

from lmfusion_jax.run_config import load_config

LMFUSION = pathlib.Path(__file__).with_name("llama3_8b_lmfusion.py")
LLAVA_NEXT_8B_VOCAB = 128_320       # llama3-llava-next-8b-hf text_config.vocab_size (Llama-3's 128,256 + 64)


def get_config(arg: str = ""):
  c = load_config(f"{LMFUSION}:{arg}")
  c.model.vocab_size = LLAVA_NEXT_8B_VOCAB
  return c
