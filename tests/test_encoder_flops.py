"""planning.vae_encoder.encoder_flops, the FLOP count behind BENCHMARKS' VAE-encoding cost, against an independent
count: torch's FlopCounterMode on diffusers' AutoencoderKL encoder of the same shape (it counts every tap, padding
included, and does not see inside scaled-dot-product attention, so the attention matmuls are added)."""
import pytest

from lmfusion_jax.models.vae import VAEConfig
from lmfusion_jax.planning.vae_encoder import attention_matmul_flops, encoder_flops


@pytest.mark.parametrize("blocks,layers,size,attention,quant", [
    ((8, 16, 16), 2, 32, True, True),
    ((8, 8), 1, 24, True, True),
    ((8, 16, 16, 16), 1, 40, False, False),
])
def test_encoder_flops_match_torch_flop_counter(blocks, layers, size, attention, quant):
  import torch
  from diffusers import AutoencoderKL
  from torch.utils.flop_counter import FlopCounterMode
  kw = dict(block_out_channels=blocks, layers_per_block=layers, norm_num_groups=4, latent_channels=4,
            mid_block_add_attention=attention, use_quant_conv=quant)
  model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), **kw)
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    model.encode(torch.zeros(1, 3, size, size))
  cfg = VAEConfig(**kw)
  want = counter.get_total_flops() + attention_matmul_flops(cfg, size)
  assert encoder_flops(cfg, size, count_padding=True) == want
  # without the padding taps the count is lower, by the border taps only
  assert 0.5 * want < encoder_flops(cfg, size) < want
