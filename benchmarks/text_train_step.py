"""CPU train-step time of our Llama text model vs HF torch LlamaForCausalLM (same config, same batch, one run).

  python benchmarks/text_train_step.py [--batch 4] [--seq 256] [--pairs 15] [--warmup 1]

One step = forward + next-token loss + backward + AdamW update, fp32. Ours: one jitted pure step (unrolled
layers). Torch: eager forward/backward + torch.optim.AdamW. After --warmup steps of each (JAX compiles
there), the two are timed in --pairs adjacent pairs, alternating which goes first (ours HF, HF ours, ...),
so machine-load drift between pairs cancels out of each pair's ratio. Prints the median and the range
(min-max) of the per-pair ratios ours / HF, the median step times, the command, the machine and the date.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from lmfusion_jax.training import losses
from lmfusion_jax.models.config import LlamaConfig  # noqa: E402
from lmfusion_jax.models.llama import Llama  # noqa: E402
import timing  # noqa: E402



def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=4, help="rows per step (default: %(default)s)")
  ap.add_argument("--seq", type=int, default=256, help="tokens per row (default: %(default)s)")
  ap.add_argument("--pairs", type=int, default=15,
                  help="interleaved (ours, HF) timing pairs; median and range of their ratios (default: %(default)s)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (default: %(default)s)")
  a = ap.parse_args()
  hfc = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
  cfg = LlamaConfig.from_hf_dict(hfc.to_dict())
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (a.batch, a.seq + 1))

  model = Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = optax.adamw(1e-4)
  opt = tx.init(params)
  x, y = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)

  def loss_fn(p):
    st = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(st, p)
    logits, _ = nnx.merge(graphdef, st)(x)
    return losses.lm_loss(logits, y, jnp.ones(y.shape))[0]

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  holder = {"p": params, "o": opt}

  def ours():
    holder["p"], holder["o"], loss = step(holder["p"], holder["o"])
    loss.block_until_ready()

  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hfc)
  topt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
  tx_t, ty_t = torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:])

  def theirs():
    topt.zero_grad()
    logits = hf(tx_t).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty_t.reshape(-1))
    loss.backward()
    topt.step()

  load0 = timing.loadavg()
  r = timing.interleaved(timing.wall(ours), timing.wall(theirs), a.pairs, warmup=a.warmup)
  t_ours, t_hf = r.median_a, r.median_b
  lo, hi = r.ratio_range
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  print(f"config: {n / 1e6:.1f}M params (dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}), "
        f"batch {a.batch} x {a.seq}, fp32, torch threads {torch.get_num_threads()}")
  print("| train step | median ms | tokens/s at median | ours / HF time: median of per-pair ratios (range) |")
  print("|---|---|---|---|")
  tok = a.batch * a.seq
  print(f"| lmfusion-jax (jit) | {t_ours * 1e3:.1f} | {tok / t_ours:.0f} | {r.median_ratio:.2f} ({lo:.2f}-{hi:.2f}) |")
  print(f"| HF transformers (torch eager) | {t_hf * 1e3:.1f} | {tok / t_hf:.0f} | 1.00 |")
  print(r.summary("ours", "HF"))
  print(r.per_pair("ours", "HF"))
  print(f"command: `{timing.command()}`; machine: {timing.machine()}; 1-min load average {load0} at start, "
        f"{timing.loadavg()} at end")


if __name__ == "__main__":
  main()
