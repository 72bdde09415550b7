"""Tokenizer helpers: train a small byte-level BPE locally, look up the special ids by name.

The special tokens follow Llama-3: `<|begin_of_text|>` (BOS), `<|end_of_text|>` (EOS), and two of its
reserved specials used as image delimiters, `<|reserved_special_token_0|>` (BOI) and
`<|reserved_special_token_1|>` (EOI). With frozen text embeddings BOI/EOI must be existing vocabulary
ids, so `special_ids` looks every one of them up BY NAME: the same code works for a real Llama-3
tokenizer folder and for the tiny ones trained here for tests and demos.
"""
from __future__ import annotations

import os
from typing import Iterable

from lmfusion_jax.checkpoints.files import write_dir
from lmfusion_jax.errors import UserError

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
BOI = "<|reserved_special_token_0|>"
EOI = "<|reserved_special_token_1|>"
PAD = "<|finetune_right_pad_id|>"  # Llama-3.1's padding token
SPECIAL_TOKENS = (BOS, EOS, BOI, EOI, PAD)


class TokenizerError(UserError):
  """A tokenizer lacks a token the model needs; the message names the token."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
  """Trains a byte-level BPE on `texts` and saves an HF tokenizer folder at `out_dir`.

  The folder loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`; encoding with
  `add_special_tokens=True` prepends BOS (as Llama-3 does). Written to a temporary sibling folder and
  renamed, so `out_dir` is either absent or complete. Returns the loaded tokenizer.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise TokenizerError(f"vocab_size={vocab_size} is below the byte alphabet + specials "
                         f"({256 + len(SPECIAL_TOKENS)})")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, bos_id)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 extra_special_tokens=[BOI, EOI])

  out_dir = os.path.abspath(os.fspath(out_dir))
  write_dir(out_dir, lambda tmp: fast.save_pretrained(os.fspath(tmp)), overwrite=True)
  return AutoTokenizer.from_pretrained(out_dir)


def load_tokenizer(tokenizer_dir: str):
  """Loads an HF tokenizer folder (a real Llama-3 one or one written by `train_tokenizer`)."""
  from transformers import AutoTokenizer
  if not os.path.isdir(os.fspath(tokenizer_dir)):
    what = "is a file, not a folder" if os.path.exists(os.fspath(tokenizer_dir)) else "does not exist"
    raise TokenizerError(f"tokenizer folder {tokenizer_dir!r} {what} (expected a local Hugging Face "
                         f"tokenizer folder)")
  try:
    return AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir), local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # transformers / tokenizers raise many types (OSError, ValueError, KeyError, the Rust `Exception`) for a
    # folder that holds no usable tokenizer; all of them are about this folder. One line, first sentence.
    reason = " ".join(str(e).split())
    reason = reason if len(reason) <= 200 else reason[:200] + " ..."
    raise TokenizerError(f"tokenizer folder {tokenizer_dir!r} holds no loadable Hugging Face tokenizer "
                         f"({type(e).__name__}: {reason})") from e


def special_ids(tokenizer) -> dict:
  """{"bos", "eos", "boi", "eoi", "pad"} -> token id, each looked up by its Llama-3 name.

  `pad` is the tokenizer's pad token if it has one, else `<|finetune_right_pad_id|>` if present,
  else EOS (padding slots are masked out anyway).
  """
  vocab = tokenizer.get_vocab()
  ids = {}
  for key, name in (("bos", BOS), ("eos", EOS), ("boi", BOI), ("eoi", EOI)):
    if name not in vocab:
      raise TokenizerError(f"tokenizer has no token {name!r} (needed as {key.upper()})")
    ids[key] = int(vocab[name])
  if getattr(tokenizer, "pad_token_id", None) is not None:
    ids["pad"] = int(tokenizer.pad_token_id)
  elif PAD in vocab:
    ids["pad"] = int(vocab[PAD])
  else:
    ids["pad"] = ids["eos"]
  return ids


class CaptionEncoder:
  """Picklable caption -> token ids (no special tokens; special-token text in captions is split).

  A caption that literally contains "<|reserved_special_token_0|>" must not become a BOI, so the
  text is always encoded as plain bytes.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> list:
    return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
