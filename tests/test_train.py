"""Training checks (issue 4): frozen text, trainable text, separation modes, FLOPs of the frozen step,
checkpoint restore on other meshes, overfitting, gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax import sharding
from lmfusion_jax.training import optimizer as optim
from lmfusion_jax.training import step as ts
from lmfusion_jax.data.pipeline import make_eval_iterator
from lmfusion_jax.data.tokenizer import load_tokenizer
from lmfusion_jax.models import sharded
from lmfusion_jax.run_config import model_configs
from lmfusion_jax.training.loop import global_batch, resolve_special_ids, train


def resolved(cfg):
  lcfg, fcfg, dcfg = model_configs(cfg)
  lcfg, fcfg = resolve_special_ids(cfg, lcfg, fcfg, load_tokenizer(cfg.data.tokenizer_dir))
  spec = ts.StepSpec(lcfg, fcfg, dcfg, optim.trainable_branches(cfg.optim), int(cfg.optim.accum_steps))
  return spec, optim.make_optimizer(cfg.optim, cfg.total_steps)


def restore_final(cfg, mesh=None):
  spec, tx = resolved(cfg)
  mesh = mesh or sharding.mesh_from_config(cfg.mesh)
  ck = ckpt_lib.Checkpointer(f"{cfg.workdir}/checkpoints", save_every=1, keep=10)
  state = ck.restore(ck.latest_step(), ts.abstract_state(spec, tx, mesh))
  ck.close()
  return spec, tx, state


def paths(tree):
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def example_batch(cfg, mesh):
  tok = load_tokenizer(cfg.data.tokenizer_dir)
  host = next(make_eval_iterator(cfg.data, tok, process_index=0, process_count=1))
  return host, global_batch(host, mesh, None)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_frozen_text_is_bitwise_unchanged_and_has_no_optimizer_state(frozen_run):
  cfg, metrics = frozen_run
  assert metrics["step"] == cfg.total_steps and np.isfinite(metrics["loss"])
  spec, tx, state = restore_final(cfg)
  assert spec.trainable == ("image",)
  _, init = sharded.init_sharded(spec.lcfg, spec.fcfg, sharding.mesh_from_config(cfg.mesh), seed=cfg.seed)
  assert_trees_equal(state["params"]["text"], init["text"])
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state["params"]["image"]), jax.tree.leaves(init["image"]))]
  assert sum(changed) > 0.9 * len(changed)
  opt_paths = paths(state["opt_state"])
  assert opt_paths and not any("text" in p.split("/") for p in opt_paths), opt_paths[:5]
  mu = [p for p in opt_paths if "/mu/" in f"/{p}/"]
  assert len(mu) == len(jax.tree.leaves(state["params"]["image"]))  # Adam moments: image leaves only
  # ... and each moment is sharded like its parameter (not replicated on every device).
  q_param = state["params"]["image"]["layers"]["q"]
  moments = [x for p, x in zip(opt_paths, jax.tree.leaves(state["opt_state"])) if p.endswith("image/layers/q")]
  assert len(moments) == 2 and q_param.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert all(m.sharding.spec == q_param.sharding.spec for m in moments)


def test_checkpoint_from_8_devices_restores_on_1_device_and_fsdp8(frozen_run):
  cfg, _ = frozen_run
  losses = {}
  meshes = {"fsdp4_tensor2": sharding.make_mesh(fsdp=4, tensor=2),
            "one_device": sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]),
            "fsdp8": sharding.make_mesh(fsdp=8)}
  for name, mesh in meshes.items():
    spec, _, state = restore_final(cfg, mesh)
    assert state["params"]["text"]["layers"]["q"].sharding.mesh.shape == mesh.shape
    host, batch = example_batch(cfg, mesh)
    t = jnp.full(host["image_segment_ids"].shape, 250, jnp.int32)
    with jax.set_mesh(mesh):
      m = jax.jit(ts.make_eval_step(spec))(state["params"], batch, jax.random.key(0), t)
    losses[name] = {k: float(v) for k, v in m.items()}
  ref = losses["fsdp4_tensor2"]
  for name, m in losses.items():
    for k in ("loss", "text_loss", "image_loss"):
      assert abs(m[k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])), (name, k, m[k], ref[k])


def run_steps(cfg, n, batch_mesh=None):
  spec, tx = resolved(cfg)
  mesh = batch_mesh or sharding.mesh_from_config(cfg.mesh)
  host, batch = example_batch(cfg, mesh)
  _, params = sharded.init_sharded(spec.lcfg, spec.fcfg, mesh, seed=0)
  init = jax.tree.map(np.asarray, params)
  state = ts.new_state(spec, tx, params, 0, mesh)
  step = ts.jit_train_step(spec, tx, mesh, batch)
  metrics = None
  for _ in range(n):
    state, metrics = step(state, batch)
  return spec, host, batch, init, state, metrics


@pytest.mark.parametrize("separation", ["shallow", "none"])
def test_other_separation_modes_train(tiny_config, separation):
  cfg = tiny_config
  cfg.fusion.separation = separation
  cfg.optim.warmup_steps = 0  # the zero-initialized U-Net output needs one step before the rest gets gradients
  spec, _, _, init, state, metrics = run_steps(cfg, 3)
  assert np.isfinite(float(metrics["loss"]))
  owned = {"shallow": {"ffn_norm", "gate", "up", "down"}, "none": set()}[separation]
  assert set(state["params"]["image"].get("layers", {})) == owned
  assert_trees_equal(state["params"]["text"], init["text"])
  moved = [not np.array_equal(np.asarray(a), b) for a, b in
           zip(jax.tree.leaves(state["params"]["image"]), jax.tree.leaves(init["image"]))]
  assert sum(moved) > 0.9 * len(moved)


def test_trainable_text_changes_text_and_overfits_both_losses(tiny_config):
  cfg = tiny_config
  cfg.optim.text_lr = cfg.optim.text_final_lr = 3e-3
  cfg.optim.image_final_lr = 3e-3
  cfg.optim.warmup_steps = 0
  spec, tx = resolved(cfg)
  assert spec.trainable == ("text", "image")
  mesh = sharding.mesh_from_config(cfg.mesh)
  host, batch = example_batch(cfg, mesh)
  _, params = sharded.init_sharded(spec.lcfg, spec.fcfg, mesh, seed=0)
  init_text = jax.tree.map(np.asarray, params["text"])
  eval_step = jax.jit(ts.make_eval_step(spec))
  t = jnp.full(host["image_segment_ids"].shape, 300, jnp.int32)
  before = eval_step(params, batch, jax.random.key(1), t)
  state = ts.new_state(spec, tx, params, 0, mesh)
  assert any("text" in p.split("/") for p in paths(state["opt_state"]))
  step = ts.jit_train_step(spec, tx, mesh, batch)
  for _ in range(40):
    state, _ = step(state, batch)
  after = eval_step(state["params"], batch, jax.random.key(1), t)
  assert float(after["text_loss"]) < 0.7 * float(before["text_loss"]), (before["text_loss"], after["text_loss"])
  assert float(after["image_loss"]) < 0.7 * float(before["image_loss"]), (before["image_loss"], after["image_loss"])
  diffs = [np.abs(np.asarray(a) - b).max() for a, b in
           zip(jax.tree.leaves(state["params"]["text"]), jax.tree.leaves(init_text))]
  assert min(diffs) > 0, "every text leaf moves when text_lr > 0"


def _train_step_flops(cfg):
  spec, tx = resolved(cfg)
  mesh = sharding.mesh_from_config(cfg.mesh)
  _, batch = example_batch(cfg, mesh)
  step = ts.jit_train_step(spec, tx, mesh, batch)
  with jax.set_mesh(mesh):
    cost = step.lower(ts.abstract_state(spec, tx, mesh), batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return spec, cost["flops"] * len(jax.devices())  # cost analysis is per device (pure data parallel here)


def test_frozen_step_saves_at_least_the_text_weight_gradient_flops(tiny_config):
  """Analytic expectation: a trainable text branch adds 2 x (text layer weights) x (text tokens) x layers
  plus 2 x embed x vocab x text tokens (LM head) FLOPs of weight gradients, plus its optimizer update."""
  cfg = tiny_config
  cfg.mesh.fsdp, cfg.mesh.data = 1, -1
  spec, frozen = _train_step_flops(cfg)
  cfg.optim.text_lr = 1e-3
  _, unfrozen = _train_step_flops(cfg)
  share = flops_lib.train_step_flops(spec.lcfg, spec.fcfg, cfg.data.global_batch_size, cfg.data.text_len,
                                     cfg.data.image_slots, False)["text_weight_grad_share"]
  assert unfrozen - frozen >= share, (frozen, unfrozen, share)


def test_gradient_accumulation_averages_microbatch_gradients(tiny_config):
  """accum_steps=2 applies the mean of the two half-batch gradients (each computed separately here)."""
  cfg = tiny_config
  cfg.optim.grad_clip = 0.0
  cfg.optim.warmup_steps = 0
  spec, tx = resolved(cfg)
  mesh = sharding.mesh_from_config(cfg.mesh)
  host, batch = example_batch(cfg, mesh)
  _, params = sharded.init_sharded(spec.lcfg, spec.fcfg, mesh, seed=0)
  loss_fn = ts.make_loss_fn(spec)
  grad_fn = jax.jit(jax.grad(lambda tr, fr, b, r: loss_fn(tr, fr, b, r)[0]))
  trainable, frozen = ts.split_params(params, spec.trainable)
  rng = jax.random.fold_in(jax.random.key(0), 0)  # the step's rng: fold_in(seed key, step)
  halves = [jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], host) for i in range(2)]
  g = [grad_fn(trainable, frozen, h, jax.random.fold_in(rng, i)) for i, h in enumerate(halves)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *g)
  spec2 = ts.StepSpec(spec.lcfg, spec.fcfg, spec.dcfg, spec.trainable, accum_steps=2)
  state = ts.new_state(spec2, tx, params, 0, mesh)
  start = jax.tree.map(np.asarray, state["params"]["image"])
  new, metrics = jax.jit(ts.make_train_step(spec2, tx))(state, batch)
  np.testing.assert_allclose(float(metrics["grad_norm"]),
                             float(np.sqrt(sum((np.asarray(e) ** 2).sum() for e in jax.tree.leaves(expected)))),
                             rtol=1e-5)
  # Adam's first step moves each weight by lr * sign(g) (bias-corrected m/sqrt(v)); check the sign pattern.
  upd = jax.tree.map(lambda a, b: np.asarray(a) - b, new["params"]["image"], start)
  for u, e in zip(jax.tree.leaves(upd), jax.tree.leaves(expected["image"])):
    e = np.asarray(e)
    big = np.abs(e) > 1e-6
    assert np.array_equal(np.sign(u[big]), -np.sign(e[big]))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config):
  from lmfusion_jax.training.loop import NonFiniteLossError
  cfg = tiny_config
  cfg.optim.image_lr = cfg.optim.image_final_lr = 1e30  # the first update blows the image weights up
  cfg.optim.warmup_steps = 0
  cfg.optim.grad_clip = 0.0
  cfg.total_steps, cfg.save_every, cfg.log_every = 6, 1, 100
  with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 2"):
    train(cfg)
  ck = ckpt_lib.Checkpointer(f"{cfg.workdir}/checkpoints", save_every=1, keep=10)
  assert ck.all_steps() == [1]
  spec, tx = resolved(cfg)
  state = ck.restore(1, ts.abstract_state(spec, tx, sharding.mesh_from_config(cfg.mesh)))
  ck.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("separation,image_init", [("deep", "copy"), ("shallow", "copy"), ("none", "copy"),
                                                   ("deep", "random")])
def test_init_from_a_text_only_checkpoint_builds_the_image_branch(tiny_config, tmp_path, separation, image_init):
  """`init_from` a text-only params checkpoint (e.g. the demo's pretrained LM): text restored exactly, the
  image branch built for the run's separation mode with the model's exact tree (no `layers` for none)."""
  from lmfusion_jax.checkpoints import params as params_io
  from lmfusion_jax.models.decoder import IMAGE_LAYER_KEYS
  from lmfusion_jax.training.setup import load_init_params
  cfg = tiny_config
  cfg.fusion.separation, cfg.fusion.image_init = separation, image_init
  spec, _ = resolved(cfg)
  mesh = sharding.mesh_from_config(cfg.mesh)
  _, params = sharded.init_sharded(spec.lcfg, spec.fcfg, mesh, seed=5)
  text = jax.tree.map(np.asarray, params["text"])
  params_io.save_params(str(tmp_path / "text_only"), {"text": text}, spec.lcfg)
  got = load_init_params(str(tmp_path / "text_only"), spec.lcfg, spec.fcfg, mesh, seed=0)
  want_paths = sorted(paths(sharded.abstract_params(spec.lcfg, spec.fcfg, mesh)))
  assert sorted(paths(got)) == want_paths
  assert_trees_equal(got["text"], text)
  for k in IMAGE_LAYER_KEYS[separation]:
    same = np.array_equal(np.asarray(got["image"]["layers"][k]), text["layers"][k])
    assert same == (image_init == "copy" or k.endswith("norm")), k
