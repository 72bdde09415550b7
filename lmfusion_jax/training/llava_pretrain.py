"""Pretraining a small LLaVA here (the LLaVAFusion demo's VLM): image-caption pairs as documents
`BOS <image> x N caption EOS`, the image tokens being the prompt and the loss on the caption tokens + EOS.

  rows = caption_rows(captions, ...)            tokens / targets / loss_mask / positions / segment_ids [n, S]
  params = {"text": Llama pure dict, "vision": LlavaVision pure dict}
  params = pretrain(cfg, params, tiles, rows, stages, text_rows=...)

The forward is the understanding path of models/llava.py: the tower's chosen layer -> projector -> the rows of the
image tokens (place_image_features) -> our Llama on the embedded sequence, causal. Training runs in `Stage`s, each
naming the parts it trains: ("vision",) trains tower + projector with the LM frozen (LLaVA's stage 1),
("vision", "text") trains everything (LLaVA's stage 2). A frozen part gets no gradient and no optimizer state.
When the text trains, text-only rows (the LM's own packed corpus, text_pretrain.pack_text) can be mixed into each
step with weight `text_weight`, so the LM keeps what it knew besides captioning. AdamW with warmup + cosine decay;
one jitted step, pure over pytrees.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmfusion_jax.errors import UserError
from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.models.llama import Llama
from lmfusion_jax.models.llava import LlavaConfig, LlavaVision, place_image_features
from lmfusion_jax.training import losses, text_pretrain

PARTS = ("text", "vision")


class Stage(NamedTuple):
  parts: tuple          # which of PARTS train
  steps: int
  lr: float             # peak learning rate (warmup 5%, cosine to lr / 10)


def caption_rows(captions: Sequence[Sequence[int]], *, num_image_tokens: int, image_token: int, bos: int, eos: int,
                 pad: int, seq_len: int) -> dict:
  """One row per caption, `BOS <image> x N caption EOS` then padding:
  tokens / targets (the next token) [n, S] int32, loss_mask [n, S] float32 (1 where the target is a caption
  token or EOS), positions [n, S] int32, segment_ids [n, S] int32 (1 on the document, 0 on padding)."""
  n = len(captions)
  tokens = np.full((n, seq_len), pad, np.int32)
  targets = np.full((n, seq_len), pad, np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  segs = np.zeros((n, seq_len), np.int32)
  for i, cap in enumerate(captions):
    doc = [bos] + [image_token] * num_image_tokens + list(cap) + [eos]
    if len(doc) > seq_len:
      raise UserError(f"llava pretraining: caption {i} makes a {len(doc)}-token document (with "
                      f"{num_image_tokens} image tokens); seq_len is {seq_len}")
    if image_token in cap:
      raise UserError(f"llava pretraining: caption {i} holds the image token {image_token}")
    k = len(doc)
    tokens[i, :k] = doc
    targets[i, :k - 1] = doc[1:]
    mask[i, num_image_tokens:k - 1] = 1.0        # the last image token predicts the caption's first token
    segs[i, :k] = 1
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
  return {"tokens": tokens, "targets": targets, "loss_mask": mask, "positions": positions, "segment_ids": segs}


def init_vision(cfg: LlavaConfig, seed: int) -> dict:
  """A fresh LlavaVision (tower + projector) as a pure dict."""
  return nnx.to_pure_dict(nnx.state(LlavaVision(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def _templates(cfg: LlavaConfig, text_cfg: LlamaConfig) -> dict:
  """part -> (graphdef, abstract state) of the modules the pure dicts fill."""
  return {"text": nnx.split(nnx.eval_shape(lambda: Llama(text_cfg, rngs=nnx.Rngs(0)))),
          "vision": nnx.split(nnx.eval_shape(lambda: LlavaVision(cfg, rngs=nnx.Rngs(0))))}


def _module(template, pure: dict):
  graphdef, abstract = template
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def caption_loss(text: Llama, vision: LlavaVision, batch: dict, image_token: int) -> jax.Array:
  """Mean NLL of the caption tokens + EOS given the images: tiles [B, H, W, C] -> features [B, N, D], placed at the
  N image tokens of each row of tokens [B, S]."""
  feats = vision(batch["tiles"])                                               # [B, N, D]
  tokens = batch["tokens"]
  x = place_image_features(text.embed_tokens(tokens), tokens, feats.reshape(-1, feats.shape[-1]), image_token)
  logits, _ = text.forward_embedded(x, batch["positions"], batch["segment_ids"])   # [B, S, V]
  return losses.lm_loss(logits, batch["targets"], batch["loss_mask"])[0]


def text_loss(text: Llama, batch: dict) -> jax.Array:
  """Mean next-token NLL of packed text rows (text_pretrain.pack_text fields) [B, S]."""
  logits, _ = text(batch["tokens"], batch["text_positions"], batch["text_segment_ids"])
  return losses.lm_loss(logits, batch["targets"], batch["loss_mask"])[0]


def make_step(templates: dict, tx, image_token: int, text_weight: float):
  """step(trained, frozen, opt, batch, text_batch) -> (trained, opt, (caption loss, text loss)): gradients of the
  parts in `trained` only. text_batch is used when text_weight > 0 (pass None otherwise; text loss 0)."""

  def loss_fn(trained, frozen, batch, text_batch):
    params = {**frozen, **trained}
    text, vision = _module(templates["text"], params["text"]), _module(templates["vision"], params["vision"])
    cap = caption_loss(text, vision, batch, image_token)
    txt = text_loss(text, text_batch) if text_weight > 0 else jnp.zeros(())
    return cap + text_weight * txt, (cap, txt)

  @jax.jit
  def step(trained, frozen, opt, batch, text_batch):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, frozen, batch, text_batch)
    updates, opt = tx.update(grads, opt, trained)
    return optax.apply_updates(trained, updates), opt, aux

  return step


def check_stages(stages: Sequence[Stage]) -> None:
  for i, s in enumerate(stages):
    if not s.parts or set(s.parts) - set(PARTS):
      raise UserError(f"llava pretraining stage {i}: parts={list(s.parts)}; expected a non-empty subset of "
                      f"{list(PARTS)}")
    if s.steps < 0 or s.lr <= 0:
      raise UserError(f"llava pretraining stage {i}: steps={s.steps}, lr={s.lr}; need steps >= 0 and lr > 0")


def pretrain(cfg: LlavaConfig, params: dict, tiles: np.ndarray, rows: dict, stages: Sequence[Stage], *,
             batch_size: int, seed: int, text_rows: Optional[dict] = None, text_weight: float = 0.0,
             log_every: int = 100, log=print) -> dict:
  """Trains {"text", "vision"} on images tiles [n, H, W, C] (preprocessed, NHWC) and their caption_rows [n, S],
  stage after stage; returns the params (pure dict)."""
  check_stages(stages)
  if len(tiles) != len(rows["tokens"]):
    raise UserError(f"llava pretraining: {len(tiles)} images but {len(rows['tokens'])} caption rows")
  templates = _templates(cfg, cfg.text)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, params)
  for k, stage in enumerate(stages):
    if stage.steps == 0:
      continue
    weight = float(text_weight) if "text" in stage.parts and text_rows is not None else 0.0
    tx = text_pretrain.pretrain_optimizer(stage.steps, stage.lr)
    trained = {p: params[p] for p in stage.parts}
    frozen = {p: v for p, v in params.items() if p not in stage.parts}
    opt = jax.jit(tx.init)(trained)
    step = make_step(templates, tx, cfg.image_token_index, weight)
    for i in range(stage.steps):
      idx = rng.integers(0, len(tiles), batch_size)
      batch = {"tiles": tiles[idx], **{name: v[idx] for name, v in rows.items()}}
      text_batch = None
      if weight > 0:
        tidx = rng.integers(0, len(text_rows["tokens"]), batch_size)
        text_batch = {name: v[tidx] for name, v in text_rows.items()}
      trained, opt, (cap, txt) = step(trained, frozen, opt, batch, text_batch)
      if log_every and ((i + 1) % log_every == 0 or i + 1 == stage.steps):
        log(f"llava pretraining stage {k + 1} ({'+'.join(stage.parts)}) step {i + 1}/{stage.steps} "
            f"caption loss {float(cap):.4f}" + (f" text loss {float(txt):.4f}" if weight > 0 else ""))
    params = {**frozen, **trained}
  return jax.tree.map(np.asarray, params)
