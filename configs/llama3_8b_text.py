r"""Text-only Llama-3-8B, every weight trained: the reference trainer's own model (MaxText's llama3-8b) at the
shapes of configs/llama3_8b_lmfusion.py, so `plan` compares like with like: 256 rows x 4096 text tokens per step
(1,048,576 tokens), bf16 compute, fp32 parameters and AdamW state, full remat, the Pallas flash kernel, pure
FSDP over the slice (the same mesh presets).

  lmfusion-jax plan --config configs/llama3_8b_text.py:v5p-128 --topology v5p-128

No image branch to speak of: no image slots, shared weights (separation "none"), and the smallest image in/out
module there is (a linear patchify of a 2x2x1 latent: 16k parameters) only because the model class always
has one; it sees no token. For planning only: training needs image slots (the data pipeline's documents each
carry an image), and a text-only Llama is trained with a text trainer.
"""
import pathlib

from lmfusion_jax.run_config import load_config

LMFUSION = pathlib.Path(__file__).with_name("llama3_8b_lmfusion.py")


def get_config(arg: str = ""):
  c = load_config(f"{LMFUSION}:{arg}")
  c.model.remat_policy = "full"          # as the reference trainer's figure (whatever the LMFusion preset picks)
  c.fusion.separation = "none"
  c.fusion.image_io = "linear"
  c.fusion.latent_size = 2
  c.fusion.latent_channels = 1
  c.fusion.patch_size = 2
  c.data.image_slots = 0
  c.data.tokens_per_image = 1
  c.data.text_len = 4096
  c.optim.text_lr = c.optim.image_lr
  c.optim.text_final_lr = c.optim.image_final_lr
  return c
