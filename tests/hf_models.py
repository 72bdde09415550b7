"""Tiny random Hugging Face Llama models saved as safetensors folders: the independent reference for the
conversion, parity and generation tests (one builder shared by those test files)."""
import torch
import transformers

VOCAB = 300


def make_hf_llama(path, dtype=torch.float32, seed=0, max_shard_size=None, random_norms=True, **overrides):
  """A random LlamaForCausalLM (vocab 300, dim 64, 2 layers, GQA 4/2) saved at `path`.

  Weights use a wide init and (by default) random norm weights, so logits are O(1) and a mapping error
  cannot hide below a test tolerance. `overrides` go to transformers.LlamaConfig."""
  torch.manual_seed(seed)
  kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
            initializer_range=0.08, bos_token_id=1, eos_token_id=2)
  kw.update(overrides)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  if random_norms:
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
          p.copy_(1.0 + 0.3 * torch.randn_like(p))
  model = model.to(dtype)
  extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, safe_serialization=True, **extra)
  return model
