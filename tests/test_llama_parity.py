"""Our Llama (converted from HF safetensors) against transformers.LlamaForCausalLM (torch, CPU, fp32):
logits, greedy generation, and KV-cache decoding against full recomputation."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmfusion_jax.inference import sampler as sampler_lib, text as gen
from lmfusion_jax.models import sharded
from lmfusion_jax.convert import hf_llama

from hf_models import VOCAB, make_hf_llama
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE),
    "tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
  out = {}
  for i, (name, kw) in enumerate(VARIANTS.items()):
    path = tmp_path_factory.mktemp(name)
    hf = make_hf_llama(path, seed=i, **kw)
    cfg, params = hf_llama.load_hf_text_params(path)
    out[name] = (hf, cfg, params, path)
  return out


def hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_configs_round_trip_the_hf_fields(variants):
  hf, cfg, _, path = variants["llama3_rope"]
  assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 32
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps) == (4, 2, 16, 1e-5)
  assert variants["tied"][1].tie_embeddings and "lm_head" not in variants["tied"][2]
  assert json.loads((path / "config.json").read_text())["vocab_size"] == cfg.vocab_size == VOCAB


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variants, variant, scan):
  hf, cfg, params, _ = variants[variant]
  model = sharded.model(cfg.replace(scan_layers=scan), None, {"text": params})
  tokens = np.random.RandomState(1).randint(0, VOCAB, (3, 40))
  ref = hf_logits(hf, tokens)
  ours, _ = model(jnp.asarray(tokens))
  assert ref.std() > 0.3, "the test model's logits are too flat to detect mapping errors"
  np.testing.assert_array_less(np.abs(np.asarray(ours) - ref).max(), 1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(variants, variant):
  hf, cfg, params, _ = variants[variant]
  model = sharded.model(cfg, None, {"text": params})
  prompt = [1, 17, 93, 201, 5, 44]
  ours = gen.generate(model, [prompt], 32, eos_ids=())[0]
  with torch.no_grad():
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  assert len(ours) == 32
  assert ours == ref


def test_generation_stops_at_eos_like_transformers(variants):
  hf, cfg, params, _ = variants["gqa"]
  model = sharded.model(cfg, None, {"text": params})
  prompt = [1, 8, 9, 10]
  with torch.no_grad():
    free = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                       eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    eos = free[4]  # a token HF emits at step 4: declare it the end-of-sequence token
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=eos,
                      pad_token_id=0)[0, len(prompt):].tolist()
  ours = gen.generate(model, [prompt], 12, eos_ids=[eos])[0]
  assert ours == ref and ours[-1] == eos and len(ours) <= 5


def test_left_padded_batch_equals_each_prompt_alone(variants):
  hf, cfg, params, _ = variants["llama3_rope"]
  model = sharded.model(cfg, None, {"text": params})
  prompts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 200], [1, 42, 43, 44]]
  batch = gen.generate(model, prompts, 10, eos_ids=())
  for p, out in zip(prompts, batch):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                        eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
    assert out == ref


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_kv_cache_logits_equal_full_recompute(variants, variant):
  """Prefill a (left-padded) batch, feed given continuation tokens one by one through the cache, and
  compare every step's logits with one forward pass over the whole sequence."""
  _, cfg, params, _ = variants[variant]
  model = sharded.model(cfg, None, {"text": params})
  rng = np.random.RandomState(3)
  prompts = [rng.randint(0, VOCAB, 9).tolist(), rng.randint(0, VOCAB, 4).tolist()]
  cont = rng.randint(0, VOCAB, (2, 7))
  p = max(len(x) for x in prompts)
  sampler = sampler_lib.Sampler(model)
  logits, cache = sampler.prefill(prompts, cache_len=p + cont.shape[1])
  steps = [np.asarray(logits)]
  lengths = np.array([len(x) for x in prompts])
  for i in range(cont.shape[1] - 1):
    logits, cache = sampler.decode_step(cache, cont[:, i], lengths + i, p + i)
    steps.append(np.asarray(logits))
  cached = np.stack(steps, axis=1)  # [batch, 7, vocab]: logits predicting cont[:, 0..6]
  for b, prompt in enumerate(prompts):
    full_seq = np.concatenate([prompt, cont[b, :-1]])[None]
    full, _ = model(jnp.asarray(full_seq))
    want = np.asarray(full)[0, len(prompt) - 1:]
    np.testing.assert_allclose(cached[b], want, atol=2e-5, rtol=0)
