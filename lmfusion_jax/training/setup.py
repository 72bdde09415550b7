"""Everything a training run settles before it spends compute: paths, the model section, the data assets,
whether an existing workdir can be resumed with this config, and the parameters `init_from` gives.

  resolve_run_config(cfg)          absolute paths; `model.preset="init"` filled from init_from; digits assets;
                                   the tokenizer that travels with init_from when data.tokenizer_dir is empty
  check_start(...)                 a refused resume or init names the differing fields and writes nothing
  load_init_params(...)            text (+ image) branch from a params checkpoint, shapes checked first
  on_process_0(fn)                 a check only process 0 can run, its verdict shared with every process
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from etils import epath

from lmfusion_jax.checkpoints import train_state as ckpt_lib
from lmfusion_jax.checkpoints.files import absolute_path
from lmfusion_jax.errors import UserError
from lmfusion_jax.models import sharded
from lmfusion_jax.models.config import ConfigError

# Config fields that hold a local path or URL; made absolute at the boundary (gs:// untouched).
PATH_FIELDS = ("workdir", "init_from", "data.data_dir", "data.tokenizer_dir", "data.vae_dir", "eval.vae_dir",
               "model.hf_config")
# The Llama fields that fix the parameter shapes (an init checkpoint must agree on all of them).
LLAMA_ARCH = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "tie_embeddings")
# The fusion fields that fix the image branch's structure.
FUSION_ARCH = ("separation", "image_io", "latent_size", "latent_channels", "patch_size", "unet_channels",
               "unet_blocks", "unet_groups", "unet_skips", "time_embed_dim")
# model.preset = "init": the architecture comes from init_from's lmfusion.json; these run knobs stay.
RUN_KNOBS = ("param_dtype", "dtype", "scan_layers", "remat_policy", "attention_impl", "max_seq_len")


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _set(cfg, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


def absolutize_paths(cfg) -> None:
  """Makes every PATH_FIELDS value absolute, in place (run_config.json then works from any directory)."""
  for field in PATH_FIELDS:
    value = _get(cfg, field)
    if isinstance(value, str) and value:
      _set(cfg, field, absolute_path(value))


def model_from_init(cfg) -> None:
  """`model.preset = "init"`: the model and fusion architecture are init_from's (its lmfusion.json), and so
  is data.tokens_per_image; the run knobs (dtypes, scan, remat, attention, max_seq_len) stay the config's."""
  from lmfusion_jax.checkpoints import params as params_io
  if cfg.model.get("preset") != "init":
    return
  if not cfg.init_from:
    raise ConfigError("model.preset='init' takes the architecture from init_from, which is empty")
  ck_l, ck_f = params_io.read_model_config(cfg.init_from)
  model = dataclasses.asdict(ck_l)
  model["rope_scaling"] = dict(model["rope_scaling"]) if model["rope_scaling"] else None
  for k in RUN_KNOBS:
    if k in cfg.model:
      model[k] = cfg.model[k]
  with cfg.ignore_type():
    cfg.model = model
    if ck_f is not None:
      for k in FUSION_ARCH:
        cfg.fusion[k] = tuple(getattr(ck_f, k)) if k == "unet_channels" else getattr(ck_f, k)
      cfg.data.tokens_per_image = ck_f.tokens_per_image


def ensure_data_assets(cfg, log: Callable[[str], None]) -> None:
  """The digits dataset and tokenizer under the cache folder when the config leaves their paths empty
  (`lmfusion-jax train --config configs/tiny.py --config.workdir=run` needs no other flag)."""
  if cfg.data.dataset != "digits" or (cfg.data.data_dir and cfg.data.tokenizer_dir):
    return
  from lmfusion_jax.data.cache import ensure_digits_assets
  vocab = int(cfg.get("tokenizer_vocab", 0) or cfg.model.get("vocab_size", 512))
  data_dir, tok_dir = ensure_digits_assets(int(cfg.data.image_size), vocab)
  if not cfg.data.data_dir:
    cfg.data.data_dir = data_dir
    log(f"data.data_dir: using the digits dataset in {data_dir}")
  if not cfg.data.tokenizer_dir:
    cfg.data.tokenizer_dir = tok_dir
    log(f"data.tokenizer_dir: using the digits tokenizer in {tok_dir}")


def resolve_run_config(cfg, log: Callable[[str], None] = print):
  """The checks and fills of the module docstring, in place; returns cfg."""
  from lmfusion_jax.run_config import validate_run_config
  if not cfg.workdir:
    raise ConfigError("workdir is empty: set --config.workdir=DIR")
  absolutize_paths(cfg)
  validate_run_config(cfg)
  from lmfusion_jax.training.online_encoding import check_config
  check_config(cfg.data)
  if cfg.data.image_slots == 0:
    raise ConfigError("data.image_slots=0: LMFusion training documents each carry an image, so a run needs "
                      ">= 1 image slot per row (a text-only config such as configs/llama3_8b_text.py is for "
                      "`lmfusion-jax plan`: the reference trainer's shapes)")
  model_from_init(cfg)
  if not cfg.data.tokenizer_dir and cfg.init_from:
    from lmfusion_jax.checkpoints import params as params_io
    own = epath.Path(cfg.init_from) / params_io.TOKENIZER_DIR
    if params_io.has_tokenizer(own):
      cfg.data.tokenizer_dir = str(own)
      log(f"data.tokenizer_dir: the tokenizer of init_from ({own})")
  ensure_data_assets(cfg, log)
  if not cfg.data.tokenizer_dir:
    raise ConfigError("data.tokenizer_dir is empty: set --config.data.tokenizer_dir=DIR")
  return cfg


def _differences(stored: dict, current, fields) -> list:
  """Fields of `current` that differ from `stored`; a field an older run did not record has its default
  (the architecture that run had)."""
  defaults = {f.name: f.default for f in dataclasses.fields(current)}
  out = []
  for f in fields:
    a, b = stored.get(f, defaults.get(f)), getattr(current, f)
    a = tuple(a) if isinstance(a, list) else a
    if a != b:
      out.append(f"{f}: {a} in the checkpoint vs {b} in this config")
  return out


def check_start(cfg, lcfg, fcfg, mesh) -> None:
  """Before anything is written: a workdir with a run resumes only with that run's architecture; a fresh
  run's init_from must fit (lmfusion.json only; the parameters are read later)."""
  workdir = epath.Path(cfg.workdir)
  if (workdir / ckpt_lib.RUN_CONFIG).exists():
    check_resume_compatible(workdir, lcfg, fcfg)
  elif cfg.init_from:
    check_init(cfg.init_from, lcfg, fcfg, mesh, bool(cfg.get("reinit_image", False)))


def check_resume_compatible(workdir, lcfg, fcfg) -> None:
  """Refuses (before anything is written) to resume a workdir whose run had another architecture."""
  from lmfusion_jax.checkpoints.resolve import run_record
  workdir = epath.Path(workdir)
  if not (workdir / ckpt_lib.RUN_CONFIG).exists():
    return
  record = run_record(workdir)
  diff = [f"model.{d}" for d in _differences(record["llama"], lcfg, LLAMA_ARCH)]
  diff += [f"fusion.{d}" for d in _differences(record["fusion"], fcfg, FUSION_ARCH)]
  if diff:
    raise ConfigError(f"{workdir} holds a run of another architecture ({workdir / ckpt_lib.RUN_CONFIG}): "
                      f"{'; '.join(diff)}. Use a new workdir, or the run's own config; nothing was written")


def _leaf_shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def image_branch_mismatch(ck_l, ck_f, lcfg, fcfg, mesh) -> list:
  """The image-branch leaves whose shape (or presence) differs between the checkpoint's and the run's model."""
  have = _leaf_shapes(sharded.abstract_params(ck_l, ck_f, mesh)["image"])
  want = _leaf_shapes(sharded.abstract_params(lcfg, fcfg, mesh)["image"])
  return [f"image{k}: {have.get(k, 'absent')} in the checkpoint vs {want.get(k, 'absent')} in this config"
          for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


def check_init(path, lcfg, fcfg, mesh, reinit_image: bool = False) -> tuple:
  """Checks a params checkpoint can initialize the run (reads only its lmfusion.json); returns
  (load the image branch too?, why a fresh one is built otherwise). See `load_init_params`."""
  from lmfusion_jax.checkpoints import params as params_io
  ck_l, ck_f = params_io.read_model_config(path)
  diff = _differences(dataclasses.asdict(ck_l), lcfg, LLAMA_ARCH)
  if diff:
    raise ConfigError(f"init_from={path}: model field(s) differ from the run config ({'; '.join(diff)}); "
                      f"set them to the checkpoint's, or model.preset='init' to take them from it")
  if fcfg.image_init != "copy":
    return False, "fusion.image_init='random'"
  if ck_f is None:
    return False, "the checkpoint has no image branch"
  if reinit_image:
    return False, "reinit_image=true"
  fields = [f"fusion.{d}" for d in _differences(dataclasses.asdict(ck_f), fcfg, FUSION_ARCH)]
  if fields:
    leaves = image_branch_mismatch(ck_l, ck_f, lcfg, fcfg, mesh)
    more = f" and {len(leaves) - 4} more" if len(leaves) > 4 else ""
    raise ConfigError(
        f"init_from={path}: its image branch has another structure ({'; '.join(fields)}); differing leaves: "
        f"{'; '.join(leaves[:4])}{more}. Set the fusion fields to the "
        f"checkpoint's (or model.preset='init'), or --config.reinit_image=true to build a fresh image branch")
  return True, ""


def load_init_params(path, lcfg, fcfg, mesh, seed: int, reinit_image: bool = False,
                     log: Callable[[str], None] = print) -> dict:
  """Params from a `convert-llama` checkpoint, checked against the run's architecture first.

  Text: always the checkpoint's (its Llama fields must match). Image: the checkpoint's when it has a branch
  of the run's structure; a fresh one built from the text weights when it has none (a plain Llama) or when
  `reinit_image` (config `reinit_image`) asks; a structurally different one is refused, naming the fields
  and leaves that differ. fusion.image_init='random' always builds a fresh (random) branch."""
  from lmfusion_jax.checkpoints import params as params_io
  from lmfusion_jax.models.fusion import init_image_params
  load_image, why = check_init(path, lcfg, fcfg, mesh, reinit_image)
  shardings = sharded.model_shardings(lcfg, fcfg, mesh)
  if load_image:
    return params_io.load_params(path, mesh=mesh, shardings=shardings)
  log(f"image branch: built fresh from the text weights ({why})")
  text = params_io.load_params(path, mesh=mesh, shardings=shardings["text"], subtree="text")
  with jax.set_mesh(mesh):
    image = jax.jit(lambda t: init_image_params(lcfg, fcfg, t, seed), out_shardings=shardings["image"])(text)
  return {"text": text, "image": image}


def on_process_0(fn: Callable[[], None]) -> None:
  """Runs `fn` on process 0 and shares whether it raised a UserError: every process raises then (process 0
  with the error itself), so no host is left waiting in a collective for a host that gave up."""
  error = None
  if jax.process_index() == 0:
    try:
      fn()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise UserError("process 0 refused to start the run (its log says why)")
  if error is not None:
    raise error


def restore_or_init(cfg, checkpointer, abstract_state, data_iter, new_state, lcfg, fcfg, mesh,
                    log: Callable[[str], None]):
  """(state, restored step or None): the newest good checkpoint, else init_from, else random init."""
  state, step = checkpointer.restore_latest(abstract_state, data_iter, warn=log)
  if state is not None:
    log(f"resumed from {checkpointer.directory}/{step}")
    return state, step
  if cfg.init_from:
    params = load_init_params(cfg.init_from, lcfg, fcfg, mesh, cfg.seed, bool(cfg.get("reinit_image", False)), log)
    log(f"initialized from {cfg.init_from}")
  else:
    _, params = sharded.init_sharded(lcfg, fcfg, mesh, seed=cfg.seed)
    log("initialized from scratch")
  return new_state(params), None
