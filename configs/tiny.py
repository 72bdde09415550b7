r"""A CPU-sized LMFusion on the embedded digits data: the config tests, CI and the demo build on.

  lmfusion-jax train --config configs/tiny.py --config.workdir=run

With data.data_dir / data.tokenizer_dir left empty, the digits dataset and a tokenizer are built once under
~/.cache/lmfusion_jax ($LMFUSION_JAX_CACHE) and used from there. A tokenizer of your own must have at most
`model.vocab_size` tokens; BOI/EOI (fusion.boi_id / eoi_id = -1) and BOS/EOS are taken from it.
"""
from lmfusion_jax.run_config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.total_steps = 200
  c.log_every = 10
  c.save_every = 100
  c.keep_checkpoints = 2
  c.model = dict(preset="tiny", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_dim=128, max_seq_len=512, param_dtype="float32", dtype="float32", scan_layers=False,
                 remat_policy="none", attention_impl="xla")
  c.fusion.separation = "deep"
  c.fusion.image_io = "unet"
  c.fusion.latent_size = 8
  c.fusion.latent_channels = 1
  c.fusion.patch_size = 2
  c.fusion.unet_channels = (32, 64)
  c.fusion.unet_blocks = 1
  c.fusion.unet_groups = 8
  c.fusion.time_embed_dim = 64
  c.fusion.boi_id = -1
  c.fusion.eoi_id = -1
  c.optim.image_lr = 3e-3
  c.optim.image_final_lr = 3e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.data.dataset = "digits"
  c.data.image_size = 8
  c.data.text_len = 32
  c.data.image_slots = 2
  c.data.tokens_per_image = 16
  c.data.global_batch_size = 8
  c.mesh.fsdp = -1
  if arg == "synthetic":
    c.data.dataset = "synthetic"
    c.data.synthetic_channels = 1
  return c
