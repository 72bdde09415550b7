"""Pretraining a small Llama-3-shaped text LM on plain text documents (what the demo and the ablations start
from, standing in for a downloaded Llama-3). Documents "BOS text EOS" are packed into fixed-length rows with
per-document positions and segment ids (data.packing, the packer every row goes through); AdamW with warmup + cosine decay; a pure jitted step.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmfusion_jax import sharding
from lmfusion_jax.training import losses
from lmfusion_jax.data.batch import TEXT_KEYS
from lmfusion_jax.data.packing import pack_documents
from lmfusion_jax.data.sequences import text_document
from lmfusion_jax.models.config import LlamaConfig
from lmfusion_jax.models.llama import Llama


def pack_text(docs: Sequence[Sequence[int]], seq_len: int) -> dict:
  """Next-fit packing of token lists (each truncated to seq_len) into rows: the text fields of the packed-batch
  contract (tokens / text_positions / text_segment_ids / targets / loss_mask [rows, seq_len])."""
  documents = [text_document(str(i), list(d)[:seq_len]) for i, d in enumerate(docs)]
  rows = list(pack_documents(documents, seq_len, 0, (1, 1, 1)))
  return {k: np.stack([r[k] for r in rows]) for k in TEXT_KEYS}


def encode_documents(tokenizer, texts: Sequence[str], bos: int, eos: int) -> list:
  return [[bos] + list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [eos] for t in texts]


def pretrain_optimizer(steps: int, lr: float):
  """AdamW (b2 0.95, no weight decay) with clipping at 1, 5% warmup and cosine decay to lr / 10: the demos'
  pretraining stages (this text LM, the LLaVA demo's VLM)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.0))


def pretrain(lcfg: LlamaConfig, rows: dict, *, steps: int, batch_size: int, lr: float, seed: int,
             mesh: Mesh, log_every: int = 100, log=print) -> dict:
  """Trains a fresh Llama on packed rows; returns its params (pure dict, sharded on `mesh`)."""
  model = Llama(lcfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  shard = sharding.state_shardings(state, mesh)
  params = jax.device_put(params, shard)
  tx = pretrain_optimizer(steps, lr)
  opt = jax.jit(tx.init)(params)

  def loss_fn(p, batch):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    logits, _ = nnx.merge(graphdef, st)(batch["tokens"], batch["text_positions"], batch["text_segment_ids"])
    return losses.lm_loss(logits, batch["targets"], batch["loss_mask"])[0]

  @jax.jit
  def step(p, o, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  rng = np.random.default_rng(seed)
  n = len(rows["tokens"])
  bsh = NamedSharding(mesh, P(("data", "fsdp")))
  for i in range(steps):
    idx = rng.integers(0, n, batch_size)
    batch = {k: jax.device_put(v[idx], bsh) for k, v in rows.items()}
    params, opt, loss = step(params, opt, batch)
    if log_every and (i + 1) % log_every == 0:
      log(f"text pretraining step {i + 1}/{steps} loss {float(loss):.4f}")
  return params
