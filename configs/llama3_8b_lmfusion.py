r"""LMFusion on Llama-3-8B, the paper's setting (arXiv 2412.15188): deep separation, U-Net image in/out,
256x256 images -> 32x32x4 VAE latents -> 16x16 = 256 tokens per image, context 4096 = 3072 text slots +
4 image slots x 256, 256 sequences per step (1,048,576 tokens), text frozen (eta_text = 0), eta_image = 1e-4.

  lmfusion-jax plan  --config configs/llama3_8b_lmfusion.py:v5p-128 --topology v5p-128
  lmfusion-jax train --config configs/llama3_8b_lmfusion.py:v5p-128 --config.workdir=gs://BUCKET/run \
      --config.init_from=gs://BUCKET/llama3-8b-lmfusion-init \
      --config.data.data_dir=gs://BUCKET/tfds --config.data.tokenizer_dir=gs://BUCKET/llama3-tokenizer

The argument picks a mesh preset: v5p-64 (32 chips), v5p-128 (64 chips), v5p-256 (128 chips); no argument
= FSDP over every device there is. The v5p-128 preset saves matmul outputs (remat_policy=dots_saveable, the
`plan --search` pick); the others recompute the whole layer (full remat). Parameter counts: text 8.03B
(frozen) + image 7.25B (6.98B layer copies + 0.27B U-Net) = 15.28B, as the paper states (~7.25B trainable +
8B frozen).

Attention: the block-sparse Pallas TPU flash kernel for the hybrid mask (lmfusion_jax/models/flash_attention.py:
tiles the mask leaves empty are skipped); the XLA reference materializes 4096 x 4096 fp32 scores per head
(--config.model.attention_impl=xla to compare). The compiler's cost model is told the kernel computes the causal
triangle's share of the 8 x 8 tiles of a 4096-token row (36/64): exact for one causal document per row (the
text-only config), an upper bound for packed LMFusion rows, whose other documents' image blocks and padding are
skipped too (11-12% of the tiles computed on synthetic caption lengths; BENCHMARKS.md, attention kernel).

Numerics: bf16 compute, fp32 parameters for both branches. The image branch must be fp32 (AdamW updates
of lr 1e-4 x ~1e-3 vanish in bf16 weights). The frozen text branch could be stored in bf16 losslessly
(Llama-3 ships bf16 weights; it never gets an update) and would halve its all-gather traffic and its 0.5 GiB
per chip, but the model has one `param_dtype` for both branches, so both are fp32 here.
"""
from lmfusion_jax.models.flash_blocks import causal_tile_fraction
from lmfusion_jax.run_config import base_config

# topology -> mesh (data, fsdp, tensor). Pure FSDP over the slice: one v5p chip holds 4 sequences.
MESH_PRESETS = {
    "": dict(data=1, fsdp=-1, tensor=1),
    "v5p-64": dict(data=1, fsdp=32, tensor=1),
    "v5p-128": dict(data=1, fsdp=64, tensor=1),
    "v5p-256": dict(data=1, fsdp=128, tensor=1),
}
# topology -> remat policy, where `plan --search` found one faster than full remat that fits (v5p-128: saving the
# matmul outputs, 2.0 s instead of 2.27 s per step at ~70 of 95 GiB per chip; BENCHMARKS.md, TPU plan). The other
# presets keep full remat (v5p-64 holds 8 rows per chip: 50 GiB with full remat already).
REMAT_PRESETS = {"v5p-128": "dots_saveable"}


def get_config(arg: str = ""):
  if arg not in MESH_PRESETS:
    raise ValueError(f"configs/llama3_8b_lmfusion.py:{arg}: unknown mesh preset (known: "
                     f"{sorted(k for k in MESH_PRESETS if k)})")
  c = base_config()
  c.total_steps = 250_000        # (choice) the paper does not state its step count
  c.log_every = 10
  c.save_every = 1000
  c.keep_checkpoints = 3
  c.model = dict(preset="llama3_8b", param_dtype="float32", dtype="bfloat16", scan_layers=True,
                 remat_policy=REMAT_PRESETS.get(arg, "full"), attention_impl="flash",
                 attention_tile_fraction=causal_tile_fraction(4096, 512, 512))
  c.fusion.separation = "deep"
  c.fusion.image_init = "copy"
  c.fusion.image_io = "unet"
  c.fusion.latent_size = 32
  c.fusion.latent_channels = 4
  c.fusion.patch_size = 2
  c.fusion.unet_channels = (768, 1536)   # 0.27B parameters down + up, as in the paper
  c.fusion.unet_blocks = 2
  c.fusion.unet_groups = 32
  c.fusion.time_embed_dim = 256
  c.fusion.boi_id = -1                   # from the tokenizer: <|reserved_special_token_0|> / _1
  c.fusion.eoi_id = -1
  c.optim.text_lr = 0.0
  c.optim.text_final_lr = 0.0
  c.optim.image_lr = 1e-4
  c.optim.image_final_lr = 1.5e-5
  c.optim.warmup_steps = 4000
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  c.data.dataset = "image_captions"
  c.data.image_size = 256
  c.data.text_len = 3072
  c.data.image_slots = 4
  c.data.tokens_per_image = 256
  c.data.global_batch_size = 256
  c.data.num_workers = 8
  c.mesh = MESH_PRESETS[arg]
  return c
