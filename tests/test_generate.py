"""`lmfusion-jax generate` end to end (tokenizer folder + converted checkpoint) against transformers, and the
sampler against a numpy reference of temperature / nucleus (top-p) sampling."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmfusion_jax import cli
from lmfusion_jax.inference import sampler as sampler_lib, text as gen
from lmfusion_jax.models import sharded
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.convert import llama_checkpoint

from hf_models import VOCAB, make_hf_llama
CORPUS = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat and looked at the dog",
          "pack my box with five dozen liquor jugs", "how vexingly quick daft zebras jump"] * 20


def make_tokenizer(path):
  """A byte-level BPE trained here (vocab <= 300), saved as a HF tokenizer folder with <s> ... prefix."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>")
  fast.save_pretrained(path)
  return fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  tok = make_tokenizer(root / "tok")
  hf = make_hf_llama(root / "hf", random_norms=False, rms_norm_eps=1e-6, pad_token_id=0)
  llama_checkpoint.convert(root / "hf", root / "ckpt")
  return tok, hf, root


def test_tokenizer_fixture_fits_the_model(setup):
  tok, _, root = setup
  loaded = transformers.AutoTokenizer.from_pretrained(str(root / "tok"))
  ids = loaded("the lazy dog")["input_ids"]
  assert ids[0] == 1 and max(ids) < VOCAB and len(loaded) <= VOCAB


def test_cli_json_matches_transformers_generate(setup, capsys):
  tok, hf, root = setup
  prompts = ["the quick brown fox", "a cat"]
  argv = ["generate", "--checkpoint", root / "ckpt", "--tokenizer", root / "tok", "--max-new-tokens", "16",
          "--json"]
  for p in prompts:
    argv += ["--prompt", p]
  assert cli.main([str(a) for a in argv]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert len(lines) == 2
  for p, rec in zip(prompts, lines):
    ids = tok(p)["input_ids"]
    assert rec["prompt_tokens"] == ids
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=[2],
                        pad_token_id=0)[0, len(ids):].tolist()
    assert rec["tokens"] == ref
    assert rec["text"] == tok.decode(ref, skip_special_tokens=True)


def test_cli_plain_output_and_bad_tokenizer(setup, capsys, tmp_path):
  _, _, root = setup
  argv = ["generate", "--checkpoint", root / "ckpt", "--tokenizer", root / "tok", "--prompt", "the dog",
          "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.9", "--seed", "5"]
  assert cli.main([str(a) for a in argv]) == 0
  first = capsys.readouterr().out
  assert first.startswith("the dog")
  assert cli.main([str(a) for a in argv]) == 0
  assert capsys.readouterr().out == first  # same seed, same sample
  (tmp_path / "empty").mkdir()
  argv[4] = tmp_path / "empty"
  assert cli.main([str(a) for a in argv]) != 0
  assert "--tokenizer" in capsys.readouterr().err


def nucleus_reference(logits, temperature, top_p):
  """numpy: probabilities of temperature/top-p sampling (smallest top set with mass >= top_p)."""
  z = logits / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = order[before < top_p]
  q = np.zeros_like(p)
  q[keep] = p[keep]
  return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5)])
def test_sampler_matches_numpy_reference(temperature, top_p):
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.25], np.float32)
  n = 40000
  batch = jnp.broadcast_to(jnp.asarray(logits), (n, logits.size))
  draws = np.asarray(sampler_lib.sample_token(batch, jax.random.key(0), temperature, top_p, greedy=False))
  freq = np.bincount(draws, minlength=logits.size) / n
  want = nucleus_reference(logits.astype(np.float64), temperature, top_p)
  assert np.all(freq[want == 0] == 0)  # nothing outside the nucleus is ever drawn
  np.testing.assert_allclose(freq, want, atol=0.012)


def test_tiny_top_p_is_greedy_and_max_len_checked(setup):
  _, _, root = setup
  cfg, _ = params_io.read_model_config(root / "ckpt")
  model = sharded.model(cfg, None, {"text": params_io.load_params(root / "ckpt", subtree="text")})
  prompts = [[1, 40, 41, 42], [1, 7]]
  greedy = gen.generate(model, prompts, 12, eos_ids=())
  nucleus = gen.generate(model, prompts, 12, temperature=1.0, top_p=1e-6, seed=3, eos_ids=())
  assert greedy == nucleus
  with pytest.raises(ValueError, match="max_seq_len"):
    gen.generate(model, prompts, cfg.max_seq_len)
  with pytest.raises(ValueError, match="at least one token"):
    gen.generate(model, [[1], []], 4)
