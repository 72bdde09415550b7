"""`lmfusion-jax convert-llama`: a Hugging Face Llama folder -> a params checkpoint (text + image branch).

  lmfusion-jax convert-llama --hf-dir Llama-3.2-1B --out gs://bucket/llama32_1b

BOI/EOI are found by name in the folder's tokenizer (<|reserved_special_token_0|> / _1|>), and the
tokenizer files are copied into the checkpoint (OUT/tokenizer), so later commands need no --tokenizer.

Streams: every parameter leaf is a `params_io.LazyArray` that the writer fills one stored chunk (--chunk-mib)
at a time, reading only the part of the safetensors that chunk covers, so host memory stays near one chunk,
not one leaf or the model (an image-branch copy is written from the same chunk, read once). Every tensor
is checked against config.json before anything is written; on any error nothing is left at --out.
"""
from __future__ import annotations

import argparse
import time


from lmfusion_jax.commands.arg_types import non_negative_int, positive_int
from lmfusion_jax.convert import hf_llama, llama_checkpoint
from lmfusion_jax.models.config import IMAGE_IO, SEPARATIONS, ConfigError, FusionConfig, LlamaConfig

DEFAULTS = FusionConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_conversion_arguments(p, "write only the `text` branch (a plain Llama), no LMFusion image branch")


def add_conversion_arguments(p: argparse.ArgumentParser, text_only_help: str) -> None:
  """The flags convert-llama and convert-llava share."""
  p.add_argument("--hf-dir", required=True,
                 help="Hugging Face model folder: config.json plus model.safetensors, or shards with "
                      "model.safetensors.index.json")
  p.add_argument("--out", required=True, help="params checkpoint directory to create (local or gs://)")
  p.add_argument("--dtype", choices=sorted(hf_llama.NUMPY_DTYPES), default=None,
                 help="parameter dtype of the checkpoint (default: the dtype of the HF tensors)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.add_argument("--chunk-mib", type=non_negative_int, default=64,
                 help="store each array in chunks of at most this many MiB, so hosts restoring onto a "
                      "sharded mesh read only their chunks; conversion holds about one chunk at a time, so "
                      "smaller chunks also mean less host memory; 0 = one chunk per array (holds the "
                      "largest leaf) (default: %(default)s)")
  p.add_argument("--text-only", action="store_true", help=text_only_help)
  g = p.add_argument_group("image branch (LMFusion); ignored with --text-only")
  g.add_argument("--separation", choices=SEPARATIONS, default=DEFAULTS.separation,
                 help="which per-layer weights get an image copy: deep = norms+QKV+O+FFN, shallow = FFN, "
                      "none = dense (default: %(default)s)")
  g.add_argument("--image-init", choices=("copy", "random"), default=DEFAULTS.image_init,
                 help="image layer weights start as copies of the text weights or random (default: %(default)s)")
  g.add_argument("--image-io", choices=IMAGE_IO, default=DEFAULTS.image_io,
                 help="image in/out modules: U-Net down/up sampler or linear patchify (default: %(default)s)")
  g.add_argument("--latent-size", type=positive_int, default=DEFAULTS.latent_size,
                 help="VAE latent height = width (default: %(default)s)")
  g.add_argument("--latent-channels", type=positive_int, default=DEFAULTS.latent_channels,
                 help="VAE latent channels (default: %(default)s)")
  g.add_argument("--boi-id", type=int, default=None,
                 help="begin-of-image token id, an existing vocabulary id (default: the id of "
                      "<|reserved_special_token_0|> in the folder's tokenizer; without a tokenizer "
                      f"{DEFAULTS.boi_id}, Llama-3's)")
  g.add_argument("--eoi-id", type=int, default=None,
                 help="end-of-image token id (default: the id of <|reserved_special_token_1|> in the folder's "
                      f"tokenizer; without a tokenizer {DEFAULTS.eoi_id})")
  g.add_argument("--seed", type=int, default=0, help="seed of the freshly initialized image modules")


def image_delimiters(args) -> tuple:
  """(BOI, EOI) ids: the flags, else looked up by name in the HF folder's tokenizer, else Llama-3's ids."""
  from lmfusion_jax.checkpoints.params import has_tokenizer
  from lmfusion_jax.data.tokenizer import BOI, EOI, TokenizerError, load_tokenizer
  boi, eoi = args.boi_id, args.eoi_id
  if boi is not None and eoi is not None:
    return boi, eoi
  if not has_tokenizer(args.hf_dir):
    return (DEFAULTS.boi_id if boi is None else boi), (DEFAULTS.eoi_id if eoi is None else eoi)
  vocab = load_tokenizer(args.hf_dir).get_vocab()
  for flag, name, value in (("--boi-id", BOI, boi), ("--eoi-id", EOI, eoi)):
    if value is None and name not in vocab:
      raise TokenizerError(f"{args.hf_dir}: its tokenizer has no {name!r} to use as the image delimiter; "
                           f"pass {flag} with an existing (e.g. reserved special) token id")
  return (vocab[BOI] if boi is None else boi), (vocab[EOI] if eoi is None else eoi)


def fusion_config(args, cfg: LlamaConfig) -> FusionConfig:
  boi, eoi = image_delimiters(args)
  fcfg = FusionConfig(separation=args.separation, image_init=args.image_init, image_io=args.image_io,
                      latent_size=args.latent_size, latent_channels=args.latent_channels,
                      boi_id=boi, eoi_id=eoi)
  for flag, value in (("--boi-id", fcfg.boi_id), ("--eoi-id", fcfg.eoi_id)):
    if not 0 <= value < cfg.vocab_size:
      raise ConfigError(f"{flag}={value} is not a vocabulary id (vocab_size={cfg.vocab_size}); "
                        f"pick an existing (e.g. reserved special) token, or pass --text-only")
  if fcfg.boi_id == fcfg.eoi_id:
    raise ConfigError(f"--boi-id and --eoi-id must differ (both {fcfg.boi_id})")
  return fcfg


def run(args) -> int:
  t0 = time.time()
  fusion_from_args = None if args.text_only else (lambda cfg: fusion_config(args, cfg))
  cfg, fcfg, n = llama_checkpoint.convert(args.hf_dir, args.out, dtype=args.dtype, fusion_cfg=fusion_from_args, seed=args.seed,
                         overwrite=args.overwrite, chunk_mib=args.chunk_mib,
                         progress_desc="convert")
  branches = "text" if fcfg is None else f"text + image ({fcfg.separation}, {fcfg.image_io})"
  ids = "" if fcfg is None else f", BOI/EOI ids {fcfg.boi_id}/{fcfg.eoi_id}"
  print(f"wrote {args.out}: {branches}, {n / 1e6:.2f}M parameters in {cfg.param_dtype} "
        f"({cfg.n_layers} layers, dim {cfg.dim}{ids}) in {time.time() - t0:.1f}s")
  return 0
