"""`lmfusion-jax generate`: text generation from any checkpoint's text branch (the Llama) with a KV cache.

  lmfusion-jax generate --checkpoint ckpt --prompt "The capital of France is" \
      --max-new-tokens 32 [--temperature 0.8 --top-p 0.95] [--tokenizer tok_dir] [--json]

Greedy by default. Several --prompt flags run as one left-padded batch. --json prints one line per prompt:
{"prompt_tokens": [...], "tokens": [new token ids], "text": "decoded new tokens"}.

With --image (a LLaVA checkpoint: a HF LLaVA / LLaVA-NeXT folder, a convert-llava checkpoint or a LLaVAFusion run):
the understanding path, HF LLaVA's greedy tokens. Each prompt holds `<image>` where an image goes; the --image files
fill them in order across the prompts:

  lmfusion-jax generate --checkpoint llava_ckpt --image cat.png --prompt "USER: <image>\nWhat is it? ASSISTANT:"
"""
from __future__ import annotations

import argparse
import json


from lmfusion_jax.commands.arg_types import non_empty_str, non_negative_float, positive_int, probability
from lmfusion_jax.data.tokenizer import TokenizerError, load_tokenizer
from lmfusion_jax.inference import text as generate
from lmfusion_jax.models import sharded
from lmfusion_jax.inference import loading
from lmfusion_jax.models.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="params checkpoint (convert-llama), training workdir or step dir (WORKDIR/checkpoints/STEP); "
                      "only its `text` branch is read")
  p.add_argument("--tokenizer", default=None,
                 help="Hugging Face tokenizer folder (default: the one that travels with the checkpoint)")
  p.add_argument("--prompt", required=True, action="append", type=non_empty_str,
                 help="prompt text; repeat the flag for a batch of prompts")
  p.add_argument("--max-new-tokens", type=positive_int, default=64, help="new tokens per prompt (default: %(default)s)")
  p.add_argument("--temperature", type=non_negative_float, default=0.0,
                 help="0 = greedy (default); > 0 samples from softmax(logits / temperature)")
  p.add_argument("--top-p", type=probability, default=1.0,
                 help="nucleus sampling: keep the most likely tokens up to this probability mass (default: 1)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--no-bos", action="store_true", help="do not add the tokenizer's special (BOS) tokens")
  p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute and parameter dtype (default: as stored)")
  p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  p.add_argument("--image", action="append", default=[],
                 help="image file for a LLaVA checkpoint; repeat for several; each fills the next <image> of the "
                      "prompts")


def run(args) -> int:
  if args.image:
    return _run_llava(args)
  tok_dir = args.tokenizer or loading.checkpoint_tokenizer(args.checkpoint)
  if not tok_dir:
    raise ConfigError(f"--checkpoint {args.checkpoint}: no tokenizer travels with it; pass --tokenizer DIR")
  try:
    tok = load_tokenizer(tok_dir)
  except TokenizerError as e:
    raise ConfigError(f"--tokenizer {tok_dir}: {e}") from e
  cfg = loading.checkpoint_llama_config(args.checkpoint)
  if args.dtype:
    cfg = cfg.replace(param_dtype=args.dtype, dtype=args.dtype)
  # Prompts are checked against the config before the (slow) parameter restore.
  prompts = [tok(p, add_special_tokens=not args.no_bos)["input_ids"] for p in args.prompt]
  for p, ids in zip(args.prompt, prompts):
    if not ids:
      raise ConfigError(f"--prompt {p!r}: encodes to no tokens (with --no-bos); give some text")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ConfigError(f"--prompt {p!r}: token ids {bad[:5]} are outside the model's vocabulary "
                        f"({cfg.vocab_size}); is --tokenizer the model's tokenizer?")
    if len(ids) + args.max_new_tokens > cfg.max_seq_len:
      raise ConfigError(f"--prompt {p[:40]!r}: {len(ids)} prompt tokens + --max-new-tokens "
                        f"{args.max_new_tokens} exceed the model's max_seq_len={cfg.max_seq_len}")
  _, text = loading.load_text(args.checkpoint, dtype=args.dtype)
  model = sharded.model(cfg, None, {"text": text})
  eos = set() if args.ignore_eos else {cfg.eos_id} | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  new = generate.generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, eos_ids=sorted(eos), pad_id=pad)
  for prompt_text, ids, out in zip(args.prompt, prompts, new):
    decoded = tok.decode(out, skip_special_tokens=True)
    if args.json:
      print(json.dumps({"prompt_tokens": list(ids), "tokens": out, "text": decoded}))
    else:
      print(prompt_text + decoded)
  return 0


def _run_llava(args) -> int:
  from lmfusion_jax.inference import llava_answer, llava_generate
  if llava_generate.llava_source(args.checkpoint) is None:
    raise ConfigError(f"--image needs a LLaVA checkpoint (HF LLaVA folder, convert-llava checkpoint or a run from "
                      f"one); --checkpoint {args.checkpoint} is not one")
  tok = llava_answer.load_tokenizer_for(args.checkpoint, args.tokenizer)
  llava = llava_generate.load_llava(args.checkpoint, dtype=args.dtype)
  for a in llava_answer.answer(llava, tok, args.image, args.prompt, args.max_new_tokens, add_bos=not args.no_bos,
                               ignore_eos=args.ignore_eos, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed):
    print(json.dumps({"prompt": a.prompt, "tokens": a.tokens, "text": a.text}) if args.json else a.prompt + a.text)
  return 0
