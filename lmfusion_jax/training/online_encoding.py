"""Online encoding (`data.encode="online"`): the train step turns the batch's 8-bit images into VAE latents.

Batches then carry uint8 "pixels" [batch, slots, S, S, 3] (records written by `prepare-data --encode none`),
and inside the jitted step, on the mesh, before anything else:

  pixels -> [-1, 1]               models.vae.to_model_range_on_device (bitwise prepare-data's host expression)
  -> random crop / flip           optional (data.crop_size, data.random_flip), drawn per image from the step's
                                  rng folded with AUGMENT_STREAM (the diffusion noise draws stay those of the
                                  precomputed path)
  -> VAE encoder, posterior mean  models.vae.encode_latents: the function prepare-data --vae-dir uses
  -> (z - shift) * scaling        ... latents [batch, slots, S'/f, S'/f, C]; empty slots zeroed as the
                                  pipeline pads them; then the precomputed path's loss, unchanged.

The encoder parameters (`models.vae.EncoderOnly`: encoder + quant_conv, no decoder) are a third pytree next to
the train state: frozen (no gradient: stop_gradient, and they are not an argument of the differentiated loss),
no optimizer state, NOT saved in train checkpoints: every start (and resume) reads them from data.vae_dir,
which run_config.json records, so keep that folder unchanged for the life of a run. They are replicated on
every chip (the logical names map to no mesh axis: an SD-VAE encoder is 34M parameters, 130 MiB in fp32; FSDP
would all-gather it every step for little memory); the images are sharded like the batch, over data x fsdp.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lmfusion_jax import sharding
from lmfusion_jax.models.config import ConfigError
from lmfusion_jax.models.params import abstract_split
from lmfusion_jax.models.vae import (AutoencoderKL, EncoderOnly, VAEConfig, encode_latents,
                                     to_model_range_on_device)

AUGMENT_STREAM = 0x5eed   # the step rng is folded with this for crops and flips
REPLICATED = {name: None for name in sharding.LOGICAL_RULES}   # rules: every parameter on every chip


@dataclasses.dataclass(frozen=True)
class OnlineEncoding:
  """What the step needs to encode (a static value, part of training.step.StepSpec)."""
  vae: VAEConfig
  crop_size: int = 0           # 0 = the stored image whole
  random_flip: bool = False


def from_config(data_cfg, vae_cfg: VAEConfig) -> OnlineEncoding:
  return OnlineEncoding(vae_cfg, int(data_cfg.get("crop_size", 0) or 0), bool(data_cfg.get("random_flip", False)))


def check_config(data_cfg) -> None:
  """The online fields of `config.data`, without reading anything; ConfigError naming the field."""
  from lmfusion_jax.data.pipeline import encodes_online
  from lmfusion_jax.models.config import check_int
  if not encodes_online(data_cfg):
    return
  if not data_cfg.get("vae_dir"):
    raise ConfigError("data.vae_dir is empty: data.encode='online' encodes the images with a Flax VAE in the "
                      "train step; set --config.data.vae_dir=DIR (a folder from `lmfusion-jax convert-vae`)")
  check_int("data.crop_size", data_cfg.get("crop_size", 0), minimum=0)
  if not isinstance(data_cfg.get("random_flip", False), bool):
    raise ConfigError(f"data.random_flip={data_cfg.get('random_flip')!r}: expected true or false")


def latent_shape(enc: OnlineEncoding, image_size: int) -> Tuple[int, int, int]:
  """The latents the step makes from S x S images (S = image_size), or ConfigError naming the fields."""
  crop = enc.crop_size or image_size
  if crop > image_size:
    raise ConfigError(f"data.crop_size={enc.crop_size} is larger than the dataset's images ({image_size} x "
                      f"{image_size}, data.image_size)")
  f = enc.vae.downsample_factor
  if crop % f:
    raise ConfigError(f"data.encode='online': {crop} x {crop} images (data.crop_size or data.image_size) are "
                      f"not divisible by the VAE's downsample factor {f}")
  return (crop // f, crop // f, enc.vae.latent_channels)


def check_latent_shape(enc: OnlineEncoding, image_size: int, fcfg, vae_dir: str = "") -> None:
  """The VAE's latents for these images must be the model's (fusion.latent_size / latent_channels)."""
  have = latent_shape(enc, image_size)
  want = (fcfg.latent_size, fcfg.latent_size, fcfg.latent_channels)
  if have != want:
    crop = enc.crop_size or image_size
    raise ConfigError(
        f"data.encode='online': the VAE in data.vae_dir={vae_dir or '(default)'} makes latents of shape "
        f"{list(have)} from {crop} x {crop} images (data.crop_size or data.image_size={image_size}; downsample "
        f"factor {enc.vae.downsample_factor}, {enc.vae.latent_channels} latent channels), but the model expects "
        f"{list(want)} (fusion.latent_size={fcfg.latent_size}, fusion.latent_channels={fcfg.latent_channels})")


@functools.lru_cache(maxsize=4)
def graphdef_and_abstract(vae_cfg: VAEConfig):
  """(graphdef, abstract nnx.State) of the encoder half; nothing allocated. Read-only (cached)."""
  return abstract_split(lambda: EncoderOnly(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))))


def encoder_shardings(enc: OnlineEncoding, mesh: Mesh) -> dict:
  """Pure dict of NamedShardings of the encoder parameters: replicated (see the module docstring)."""
  return sharding.state_shardings(graphdef_and_abstract(enc.vae)[1], mesh, REPLICATED)


def abstract_params(enc: OnlineEncoding, mesh: Mesh) -> dict:
  """Pure dict of ShapeDtypeStructs (with their shardings) of the encoder parameters."""
  shapes = nnx.to_pure_dict(graphdef_and_abstract(enc.vae)[1])
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      encoder_shardings(enc, mesh))


def load(data_cfg, mesh: Mesh) -> Tuple[OnlineEncoding, dict]:
  """(OnlineEncoding, encoder parameters on `mesh`) from data.vae_dir; every process reads the folder."""
  from lmfusion_jax.checkpoints.vae import load_vae
  vae_cfg, vae = load_vae(data_cfg.vae_dir)
  enc = from_config(data_cfg, vae_cfg)
  host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(EncoderOnly(vae))))
  params = jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]), host,
                        encoder_shardings(enc, mesh))
  return enc, params


def augment(images: jax.Array, rng: jax.Array, crop_size: int, random_flip: bool) -> jax.Array:
  """images [n, S, S, 3] -> [n, crop, crop, 3]: a random crop_size window per image (crop_size 0 or S: all of
  it), then a left-right flip with probability 1/2 per image."""
  n, s = images.shape[0], images.shape[1]
  if crop_size and crop_size < s:
    offsets = jax.random.randint(jax.random.fold_in(rng, 0), (n, 2), 0, s - crop_size + 1)   # [n, 2]
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (crop_size, crop_size, 3)))(
        images, offsets)
  if random_flip:
    flip = jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5, (n,))                      # [n]
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return images


def encode_pixels(enc: OnlineEncoding, params: dict, pixels: jax.Array, valid: jax.Array,
                  rng: Optional[jax.Array] = None) -> jax.Array:
  """pixels uint8 [B, I, S, S, 3], valid bool [B, I] -> latents fp32 [B, I, h, w, C], zero where not valid."""
  b, i, s = pixels.shape[:3]
  x = to_model_range_on_device(pixels.reshape(b * i, s, s, pixels.shape[-1]))   # [B*I, S, S, 3] in [-1, 1]
  x = sharding.constrain(x, ("batch", None, None, None))
  if rng is not None and (enc.crop_size or enc.random_flip):
    x = augment(x, rng, enc.crop_size, enc.random_flip)                         # [B*I, S', S', 3]
  graphdef, abstract = graphdef_and_abstract(enc.vae)
  state = jax.tree.map(lambda v: v, abstract)
  nnx.replace_by_pure_dict(state, params)
  z = jax.lax.stop_gradient(encode_latents(nnx.merge(graphdef, state), x))     # [B*I, h, w, C]
  z = z.reshape(b, i, *z.shape[1:])                                             # [B, I, h, w, C]
  return jnp.where(valid[:, :, None, None, None], z, jnp.zeros((), z.dtype))


def encode_batch(enc: OnlineEncoding, params: dict, batch: dict, rng: jax.Array) -> dict:
  """A packed batch with "pixels" -> the same batch with "latents" (the precomputed path's contract)."""
  out = {k: v for k, v in batch.items() if k != "pixels"}
  out["latents"] = encode_pixels(enc, params, batch["pixels"], batch["image_segment_ids"] > 0,
                                 jax.random.fold_in(rng, AUGMENT_STREAM))
  return out
