"""The jitted, sharded train step over pure pytrees.

Train state (a plain dict, which is also what checkpoints hold):
  params     {"text": ..., "image": ...}
  opt_state  optax state over the TRAINABLE branches only (image only when the text is frozen)
  step       int32 scalar
  rng        uint32 key data; the step's randomness is fold_in(rng, step), so a resumed run draws exactly
             the noise and timesteps an uninterrupted run draws.
Gradients are taken with respect to the trainable branches only: with eta_text = 0 no text weight gradient
is ever computed and no optimizer state exists for the text weights.
With `StepSpec.online` (data.encode="online") the step takes a third argument, the frozen VAE encoder
parameters, and first turns the batch's "pixels" into "latents" (training.online_encoding); the rest of the
step is the precomputed path's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmfusion_jax import diffusion, sharding
from lmfusion_jax.training import losses
from lmfusion_jax.training import online_encoding
from lmfusion_jax.data import batch as batch_lib
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import FusionConfig, LlamaConfig


@dataclasses.dataclass(frozen=True)
class StepSpec:
  lcfg: LlamaConfig
  fcfg: FusionConfig
  dcfg: diffusion.DiffusionConfig
  trainable: tuple            # ("image",) or ("text", "image")
  accum_steps: int = 1
  online: Optional[online_encoding.OnlineEncoding] = None   # encode "pixels" in the step (data.encode)


def split_params(params: dict, trainable: tuple):
  return ({b: params[b] for b in trainable}, {b: v for b, v in params.items() if b not in trainable})


def make_loss_fn(spec: StepSpec) -> Callable:
  graphdef, abstract = sharded.graphdef_and_abstract_state(spec.lcfg, spec.fcfg)
  schedule = diffusion.make_schedule(spec.dcfg)

  def loss_fn(trainable, frozen, batch, rng, timesteps=None):
    model = sharded.merge(graphdef, abstract, {**frozen, **trainable})
    return losses.fusion_loss(model, batch, rng, schedule, spec.dcfg, timesteps)

  return loss_fn


def _microbatches(batch: dict, k: int) -> dict:
  def split(x):
    if x.shape[0] % k:
      raise batch_lib.BatchError(f"global batch {x.shape[0]} is not divisible by accum_steps={k}")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation,
                    lr_fns: dict | None = None) -> Callable:
  loss_fn = make_loss_fn(spec)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: dict, batch: dict, encoder_params: Optional[dict] = None):
    trainable, frozen = split_params(state["params"], spec.trainable)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if spec.online is not None:   # pixels [B, I, S, S, 3] -> latents [B, I, h, w, C]
      batch = online_encoding.encode_batch(spec.online, encoder_params, batch, rng)
    if spec.accum_steps == 1:
      (_, metrics), grads = grad_fn(trainable, frozen, batch, rng)
    else:
      micro = _microbatches(batch, spec.accum_steps)

      def body(acc, xs):
        mb, i = xs
        (_, m), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, (g, m)), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      m0 = jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
      m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
      (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), (micro, jnp.arange(spec.accum_steps)))
      grads = jax.tree.map(lambda g: g / spec.accum_steps, grads)
      metrics = {k: (v if k in ("text_tokens", "images", "text_nll_sum") else v / spec.accum_steps)
                 for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if lr_fns:
      for b, fn in lr_fns.items():
        metrics[f"lr_{b}"] = fn(state["step"])
    new_state = {"params": {**frozen, **trainable}, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    return new_state, metrics

  return train_step


def init_opt_state(tx, params: dict, trainable: tuple):
  return tx.init({b: params[b] for b in trainable})


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def opt_state_shardings(tx, trainable: dict, trainable_shardings: dict, mesh: Mesh):
  """Optimizer-state shardings: every leaf that mirrors a parameter (Adam's mu/nu: same key-path suffix and
  shape) takes that parameter's sharding; counts and other scalars are replicated. (Letting XLA choose the
  outputs of a jitted tx.init replicates the whole state on every device.)"""
  params = {}
  for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]:
    params[tuple(_key_name(k) for k in path)] = x.shape
  shard = {tuple(_key_name(k) for k in path): s
           for path, s in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    names = tuple(_key_name(k) for k in path)
    for start in range(len(names)):
      suffix = names[start:]
      if suffix in params and params[suffix] == leaf.shape:
        return shard[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, trainable))


def state_shardings(spec: StepSpec, tx, mesh: Mesh) -> dict:
  """NamedShardings for the whole train state, derived without allocating anything: parameter shardings
  from the logical rules; optimizer moments take their parameter's sharding (opt_state_shardings)."""
  param_sh = sharded.model_shardings(spec.lcfg, spec.fcfg, mesh)
  abstract = sharded.abstract_params(spec.lcfg, spec.fcfg)
  trainable = {b: abstract[b] for b in spec.trainable}
  opt_sh = opt_state_shardings(tx, trainable, {b: param_sh[b] for b in spec.trainable}, mesh)
  replicated = NamedSharding(mesh, P())
  return {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}


def abstract_state(spec: StepSpec, tx, mesh: Mesh) -> dict:
  """ShapeDtypeStructs with shardings for the whole train state: the restore target on the current mesh."""
  shard = state_shardings(spec, tx, mesh)
  params = sharded.abstract_params(spec.lcfg, spec.fcfg)
  opt = jax.eval_shape(lambda p: init_opt_state(tx, p, spec.trainable), params)
  shapes = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)


def batch_shardings(mesh: Mesh, example_batch: dict) -> dict:
  return {k: sharding.batch_sharding(mesh, jnp.ndim(v)) for k, v in example_batch.items()}


def jit_train_step(spec: StepSpec, tx, mesh: Mesh, example_batch: dict, lr_fns=None):
  """jax.jit of the step with explicit in/out shardings and the state donated; with spec.online it is
  step(state, batch, encoder_params), the encoder parameters replicated."""
  st_sh = state_shardings(spec, tx, mesh)
  b_sh = batch_shardings(mesh, example_batch)
  in_sh = (st_sh, b_sh)
  if spec.online is not None:
    in_sh += (online_encoding.encoder_shardings(spec.online, mesh),)
  return jax.jit(make_train_step(spec, tx, lr_fns), in_shardings=in_sh,
                 out_shardings=(st_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def new_state(spec: StepSpec, tx, params: dict, seed: int, mesh: Mesh) -> dict:
  """A fresh train state around given (sharded) params."""
  st_sh = state_shardings(spec, tx, mesh)
  with jax.set_mesh(mesh):
    opt = jax.jit(lambda p: init_opt_state(tx, p, spec.trainable), out_shardings=st_sh["opt_state"])(params)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), st_sh["rng"])
  step = jax.device_put(jnp.zeros((), jnp.int32), st_sh["step"])
  return {"params": params, "opt_state": opt, "step": step, "rng": rng}


def make_eval_step(spec: StepSpec):
  """(params, batch, rng, timesteps [B, I]) -> metrics, with the noise drawn from `rng` and the given t's:
  a deterministic held-out loss for comparing checkpoints."""
  loss_fn = make_loss_fn(spec)

  def eval_step(params, batch, rng, timesteps):
    _, metrics = loss_fn(params, {}, batch, rng, timesteps)
    return metrics

  return eval_step
