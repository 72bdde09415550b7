r"""Transfusion-style dense baseline of the same size as configs/llama3_8b_lmfusion.py: one set of Llama-3-8B
layer weights shared by text and image tokens (separation "none"), U-Net image in/out, everything trained
with one learning rate (eta_text = eta_image = 1e-4; the paper's "dense, ratio 1" ablation). Same data
layout: 3072 text slots + 4 images x 256 tokens = 4096 per row, 256 rows per step.

  lmfusion-jax plan  --config configs/llama3_8b_dense.py:v5p-128 --topology v5p-128
  lmfusion-jax train --config configs/llama3_8b_dense.py:v5p-128 --config.workdir=gs://BUCKET/dense ...

Parameters: 8.03B text (trained) + 0.27B U-Net + final norm; optimizer state for all of them.
"""
import pathlib

from lmfusion_jax.run_config import load_config

LMFUSION = pathlib.Path(__file__).with_name("llama3_8b_lmfusion.py")


def get_config(arg: str = ""):
  c = load_config(f"{LMFUSION}:{arg}")
  c.model.remat_policy = "full"          # the baseline's figures are with full remat on every preset
  c.fusion.separation = "none"
  c.optim.text_lr = 1e-4
  c.optim.text_final_lr = 1.5e-5
  return c
