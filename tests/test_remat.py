"""The remat policies of models/decoder.py (full, and the named save_* / offload_* ones; JAX's dots policies are
JAX's own) are a memory / recompute trade only: the loss and the image-branch gradients of a real batch equal
those without remat (the same math in another order: within float32 rounding)."""
import dataclasses

import jax
import numpy as np
import pytest

from lmfusion_jax import sharding
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import REMAT_POLICIES
from lmfusion_jax.training import step as ts
from test_train import example_batch, resolved


@pytest.fixture(scope="module")
def setup(tokenizer_dir, digits_data_dir, tmp_path_factory):
  from conftest import make_tiny_config
  cfg = make_tiny_config(tokenizer_dir, digits_data_dir, tmp_path_factory.mktemp("remat") / "run")
  spec, _ = resolved(cfg)
  mesh = sharding.make_mesh(fsdp=-1)
  _, params = sharded.init_sharded(spec.lcfg, spec.fcfg, mesh, seed=0)
  _, batch = example_batch(cfg, mesh)
  return spec, mesh, params, batch


def loss_and_grads(spec, mesh, params, batch, policy):
  spec = dataclasses.replace(spec, lcfg=dataclasses.replace(spec.lcfg, remat_policy=policy))
  loss_fn = ts.make_loss_fn(spec)
  trainable, frozen = ts.split_params(params, spec.trainable)
  grad_fn = jax.jit(jax.value_and_grad(lambda tr: loss_fn(tr, frozen, batch, jax.random.key(0))[0]))
  with jax.set_mesh(mesh):
    loss, grads = grad_fn(trainable)
  return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.slow
def test_every_remat_policy_gives_the_gradients_of_no_remat(setup):
  spec, mesh, params, batch = setup
  want_loss, want = loss_and_grads(spec, mesh, params, batch, "none")
  assert np.isfinite(want_loss) and sum(float(np.abs(g).sum()) for g in want) > 0
  for policy in ("full", "save_qkv_attn", "save_out_proj", "offload_qkv_attn"):
    assert policy in REMAT_POLICIES
    loss, got = loss_and_grads(spec, mesh, params, batch, policy)
    assert loss == pytest.approx(want_loss, rel=1e-6), policy
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(w).max())), err_msg=policy)
