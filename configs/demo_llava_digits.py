r"""The LLaVAFusion demo on the embedded digits data (CPU, minutes): the digits demo's stand-in text LM ->
a tiny LLaVA pretrained here on digit captioning (CLIP ViT tower + projector, then everything) -> HF LLaVA
export -> convert-llava -> LLaVAFusion training (LMFusion with the VLM's text and vision frozen) -> eval
(generation accuracy, the understanding path's captions before vs after, bitwise) -> report.

  lmfusion-jax demo --workdir /tmp/llavafusion-demo --config configs/demo_llava_digits.py
  lmfusion-jax demo --workdir /tmp/llavafusion-ci --config configs/demo_llava_digits.py:ci   # CI-sized run

Everything else (the LM, the U-Net image branch, the LMFusion recipe, sampling) is configs/demo_digits.py's.
"""
from configs import demo_digits
from lmfusion_jax.models.config import ConfigError


def get_config(arg: str = ""):
  if arg not in ("", "ci"):
    raise ConfigError(f"configs/demo_llava_digits.py: unknown variant {arg!r} (have '', 'ci')")
  c = demo_digits.get_config(arg)
  if not arg:
    c.total_steps = 3000              # the LLaVAFusion figures (BENCHMARKS.md) were measured at 3000 steps
  # The VLM (lmfusion_jax/demo_llava.py): a CLIP ViT on the 8x8 digits (patch 2: 16 image tokens, CLS dropped),
  # fed as grey uint8 images through a CLIPImageProcessor with mean = std = 0.5.
  c.demo.llava = dict(
      vision=dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, patch_size=2,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5),
      vision_feature_layer=-1,        # the last layer's output (with 2 layers, LLaVA's -2 would use just one)
      projector_hidden_act="gelu",
      seq_len=32,                     # BOS + 16 image tokens + caption (<= 8 tokens) + EOS
      batch=32,
      # stage 1 trains tower + projector on the frozen LM; stage 2 everything, with the LM's own text corpus
      # mixed into each step (text_weight) so that it keeps its text (and its BOI/EOI image markers)
      stage1_steps=600, stage1_lr=2e-3,
      stage2_steps=300, stage2_lr=5e-4,
      text_weight=1.0,
      caption_examples=300,           # held-out digits captioned through the understanding path, before / after
      caption_max_new_tokens=12,
      caption_batch=100,
  )
  if arg == "ci":
    c.demo.llava.stage1_steps = 20
    c.demo.llava.stage2_steps = 10
    c.demo.llava.batch = 8
    c.demo.llava.caption_examples = 20
    c.demo.llava.caption_batch = 20
  return c
