"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared tiny fixtures."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Identical programs (the same tiny train/eval steps) compile once across tests and their subprocesses.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/lmfusion-jax-test-compilation-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long test (still runs in CI)")


@pytest.fixture(scope="session")
def num_devices():
  return len(jax.devices())


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """A small BPE tokenizer trained here on the digit captions (Llama-3-style special tokens)."""
  from lmfusion_jax.data.tfds_digits import all_captions
  from lmfusion_jax.data.tokenizer import train_tokenizer
  out = tmp_path_factory.mktemp("tok") / "tokenizer"
  texts = list(all_captions()) * 2 + ["the quick brown fox jumps over the lazy dog"] * 4
  train_tokenizer(texts, 400, str(out))
  return str(out)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """The embedded digits dataset built once (TFDS ArrayRecord, 8x8x1 latents)."""
  from lmfusion_jax.data.build import build_dataset
  out = tmp_path_factory.mktemp("tfds")
  build_dataset("digits", str(out), image_size=8)
  return str(out)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
  """(folder, module) of a tiny random Flax VAE saved as `convert-vae` writes it: 16 px -> [8, 8, 4] latents."""
  from flax import nnx
  from lmfusion_jax.checkpoints.vae import save_vae
  from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig
  cfg = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4)
  vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  return str(save_vae(vae, cfg, tmp_path_factory.mktemp("vae") / "vae")), vae


def make_tiny_config(tokenizer_dir, data_dir, workdir):
  """configs/tiny.py pointed at a tokenizer/data dir and a workdir; short and quiet."""
  from lmfusion_jax.run_config import load_config
  cfg = load_config("configs/tiny.py")
  cfg.workdir = str(workdir)
  cfg.data.tokenizer_dir = tokenizer_dir
  cfg.data.data_dir = data_dir
  cfg.tensorboard = False
  cfg.total_steps = 6
  cfg.log_every = 2
  cfg.save_every = 3
  return cfg


@pytest.fixture
def tiny_config(tokenizer_dir, digits_data_dir, tmp_path):
  return make_tiny_config(tokenizer_dir, digits_data_dir, tmp_path / "run")


@pytest.fixture(scope="session")
def frozen_run(tokenizer_dir, digits_data_dir, tmp_path_factory):
  """The default recipe (text frozen) trained 4 steps through the real loop on an fsdp=4 x tensor=2 mesh,
  checkpoints at steps 2 and 4. Shared by the training and evaluation tests (read-only)."""
  from lmfusion_jax.training.loop import train
  cfg = make_tiny_config(tokenizer_dir, digits_data_dir, tmp_path_factory.mktemp("frozen") / "run")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
  cfg.total_steps, cfg.save_every = 4, 2
  metrics = train(cfg)
  return cfg, metrics


PREEMPT_TOTAL = 18   # steps of the short runs of the reliability tests; checkpoints every 3 steps (last 2 kept)


def short_run_config(tokenizer_dir, data_dir, workdir):
  """The tiny config for the reliability tests: 18 steps, logged every step, an async save every 3 steps."""
  cfg = make_tiny_config(tokenizer_dir, data_dir, workdir)
  cfg.total_steps, cfg.save_every, cfg.log_every = PREEMPT_TOTAL, 3, 1
  cfg.async_checkpointing = True
  return cfg


def saved_state(workdir, step=PREEMPT_TOTAL):
  """A training checkpoint's saved state as numpy leaves (orbax, one device)."""
  import numpy as np
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="session")
def short_run(tokenizer_dir, digits_data_dir, tmp_path_factory):
  """(workdir, final state): a short run never interrupted, the reference of the stop/resume tests.
  Read-only: tests that change a workdir copy it first."""
  from lmfusion_jax.training.loop import train
  workdir = str(tmp_path_factory.mktemp("short") / "run")
  train(short_run_config(tokenizer_dir, digits_data_dir, workdir))
  return workdir, saved_state(workdir)
