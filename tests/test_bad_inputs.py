"""Bad user input gives exit 2 and one line naming the culprit (file, tensor, field or flag), never a traceback,
and leaves no output behind (lmfusion_jax.errors: the UserError contract of `lmfusion_jax.cli.main`).

Every CLI case runs through `lmfusion_jax.cli.main`; argparse-level refusals exit through SystemExit(2) with
`argument --FLAG: ...`. Config-only cases call the library (`llama_config_from`, `fusion_config_from`,
`model_configs`, `validate_run_config`). Inputs are built here: one tiny random HF Llama folder and one
params checkpoint converted from it with `lmfusion-jax convert-llama` (module-scoped), plus per-case broken
copies of the HF folder.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import make_hf_llama

VOCAB = 400  # >= the conftest tokenizer's vocabulary, so its ids are model ids


# --- inputs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer_dir):
  """{"hf": tiny HF Llama folder, "ckpt": params checkpoint converted from it, "tok": tokenizer folder,
  "root": scratch folder}."""
  from lmfusion_jax import cli
  from lmfusion_jax.data.tokenizer import load_tokenizer, special_ids
  root = tmp_path_factory.mktemp("bad_inputs")
  make_hf_llama(root / "hf", vocab_size=VOCAB)
  ids = special_ids(load_tokenizer(tokenizer_dir))
  rc = cli.main(["convert-llama", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"), "--image-io", "linear",
                 "--latent-size", "8", "--latent-channels", "1", "--boi-id", str(ids["boi"]),
                 "--eoi-id", str(ids["eoi"])])
  assert rc == 0
  return {"hf": str(root / "hf"), "ckpt": str(root / "ckpt"), "tok": tokenizer_dir, "root": str(root)}


def hf_variant(env, name, mutate) -> str:
  """A copy of the tiny HF folder changed by mutate(folder)."""
  out = os.path.join(env["root"], "hf_" + name)
  if not os.path.exists(out):
    shutil.copytree(env["hf"], out)
    mutate(out)
  return out


def truncate(folder):
  f = os.path.join(folder, "model.safetensors")
  data = open(f, "rb").read()
  open(f, "wb").write(data[: len(data) // 2])


def garbage(folder):
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"<html>404 Not Found</html>\n" * 40)


def poison(tensor, value):
  def mutate(folder):
    f = os.path.join(folder, "model.safetensors")
    tensors = load_file(f)
    tensors[tensor] = tensors[tensor].copy()
    tensors[tensor].reshape(-1)[7] = value
    save_file(tensors, f, metadata={"format": "pt"})
  return mutate


def edit_config(**changes):
  def mutate(folder):
    f = os.path.join(folder, "config.json")
    cfg = json.load(open(f))
    cfg.update(changes)
    json.dump(cfg, open(f, "w"))
  return mutate


def run_cli(argv, capsys):
  """(exit code, stderr) of cli.main(argv); argparse's SystemExit counts as an exit code."""
  from lmfusion_jax import cli
  capsys.readouterr()
  try:
    code = cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


def assert_user_error(code, err, *names):
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.strip().splitlines() if "error:" in line]
  assert len(lines) == 1, err
  for name in names:
    assert name in lines[0], (name, err)


# --- convert-llama ----------------------------------------------------------------------------------------------
def convert_argv(src, out, *extra):
  return ["convert-llama", "--hf-dir", src, "--out", out, "--image-io", "linear", "--latent-size", "8",
          "--latent-channels", "1", "--boi-id", "3", "--eoi-id", "4", *extra]


# (case id, how the HF folder is broken, what the message must name)
CONVERT_CASES = [
    ("truncated_safetensors", truncate, ["model.safetensors", "truncated"]),
    ("garbage_safetensors", garbage, ["model.safetensors"]),
    ("rope_llama3_no_fields", edit_config(rope_scaling={"rope_type": "llama3"}),
     ["config.json", "rope_scaling.factor"]),
    ("rope_llama3_bad_factor", edit_config(rope_scaling={"rope_type": "llama3", "factor": "x", "low_freq_factor": 1,
                                                         "high_freq_factor": 4,
                                                         "original_max_position_embeddings": 64}),
     ["config.json", "rope_scaling.factor"]),
    ("nan_weight", poison("model.layers.1.mlp.up_proj.weight", np.nan),
     ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN"]),
    ("inf_embedding", poison("model.embed_tokens.weight", np.inf), ["model.embed_tokens.weight", "Inf"]),
    ("negative_hidden_size", edit_config(hidden_size=-64), ["config.json", "hidden_size"]),
    ("zero_layers", edit_config(num_hidden_layers=0), ["config.json", "num_hidden_layers"]),
    ("zero_kv_heads", edit_config(num_key_value_heads=0), ["config.json", "num_key_value_heads"]),
    ("heads_not_divisible", edit_config(num_key_value_heads=3), ["config.json", "num_attention_heads",
                                                                "num_key_value_heads"]),
    ("zero_ffn", edit_config(intermediate_size=0), ["config.json", "intermediate_size"]),
    ("string_vocab", edit_config(vocab_size="many"), ["config.json", "vocab_size"]),
    ("fractional_dim", edit_config(hidden_size=64.5), ["config.json", "hidden_size"]),
]


@pytest.mark.parametrize("name,mutate,names", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_hf_folder(env, capsys, name, mutate, names):
  src = hf_variant(env, name, mutate)
  parent = os.path.join(env["root"], "out_" + name)
  os.makedirs(parent)
  code, err = run_cli(convert_argv(src, os.path.join(parent, "ckpt")), capsys)
  assert_user_error(code, err, *names)
  assert os.listdir(parent) == []  # nothing at --out, no temporary left


@pytest.mark.parametrize("flag,value", [("--chunk-mib", "-5"), ("--latent-channels", "0"), ("--latent-size", "0"),
                                        ("--latent-size", "-8"), ("--latent-channels", "two")])
def test_convert_bad_flags(env, capsys, flag, value):
  out = os.path.join(env["root"], f"out_flag{flag}{value}")
  argv = convert_argv(env["hf"], out)
  if flag in argv:
    argv[argv.index(flag) + 1] = value
  else:
    argv += [flag, value]
  code, err = run_cli(argv, capsys)
  assert_user_error(code, err, flag)
  assert not os.path.exists(out)


def test_convert_library_checks_chunk_mib(env, tmp_path):
  from lmfusion_jax.convert import llama_checkpoint
  from lmfusion_jax.models.config import ConfigError
  with pytest.raises(ConfigError, match="chunk_mib"):
    llama_checkpoint.convert(env["hf"], tmp_path / "out", chunk_mib=-5)
  assert not (tmp_path / "out").exists()


# --- config values ----------------------------------------------------------------------------------------------
LLAMA_FIELD_CASES = [
    ({"dim": 64.5}, "model.dim"), ({"dim": "64"}, "model.dim"), ({"dim": -64}, "model.dim"),
    ({"n_layers": 0}, "model.n_layers"), ({"n_kv_heads": 0}, "model.n_kv_heads"),
    ({"n_kv_heads": 3}, "model.n_kv_heads"), ({"ffn_dim": True}, "model.ffn_dim"),
    ({"norm_eps": float("nan")}, "model.norm_eps"), ({"dimm": 3}, "dimm"),
    ({"rope_scaling": {"factor": 8.0, "foo": 1}}, "foo"), ({"rope_scaling": {"factor": 0.0}}, "rope_scaling.factor"),
]


@pytest.mark.parametrize("fields,name", LLAMA_FIELD_CASES, ids=[f"{k}" for k, _ in LLAMA_FIELD_CASES])
def test_llama_config_fields(fields, name):
  from lmfusion_jax.models.config import ConfigError, llama_config_from
  with pytest.raises(ConfigError) as e:
    llama_config_from({"preset": "tiny", **fields})
  assert name in str(e.value) and "\n" not in str(e.value)


FUSION_FIELD_CASES = [
    ({"latent_size": 0}, "fusion.latent_size"), ({"latent_channels": -1}, "fusion.latent_channels"),
    ({"latent_size": 8.0}, "fusion.latent_size"), ({"unet_channels": [32, 0]}, "fusion.unet_channels"),
    ({"unet_channels": 32}, "fusion.unet_channels"), ({"time_embed_dim": 0}, "fusion.time_embed_dim"),
    ({"patch": 2}, "patch"),
]


@pytest.mark.parametrize("fields,name", FUSION_FIELD_CASES, ids=[f"{k}" for k, _ in FUSION_FIELD_CASES])
def test_fusion_config_fields(fields, name):
  from lmfusion_jax.models.config import ConfigError, fusion_config_from
  with pytest.raises(ConfigError) as e:
    fusion_config_from(fields)
  assert name in str(e.value)


@pytest.mark.parametrize("override,name", [("--config.model.n_kv_heads=0", "model.n_kv_heads"),
                                           ("--config.model.dim=-64", "model.dim"),
                                           ("--config.fusion.latent_channels=0", "fusion.latent_channels")])
def test_model_configs_from_overrides(override, name):
  from lmfusion_jax.errors import UserError
  from lmfusion_jax.run_config import apply_overrides, load_config, model_configs
  with pytest.raises(UserError) as e:
    model_configs(apply_overrides(load_config("configs/tiny.py"), [override]))
  assert name in str(e.value)


@pytest.mark.parametrize("override,name", [("--config.model.dim=64.5", "model.dim"),
                                           ("--config.model.dim=abc", "model.dim"),
                                           ("--config.model.dimm=3", "model.dimm")])
def test_train_cli_refuses_bad_overrides(tmp_path, capsys, override, name):
  code, err = run_cli(["train", "--config", "configs/tiny.py", f"--config.workdir={tmp_path / 'run'}", override],
                      capsys)
  assert_user_error(code, err, name)
  assert not (tmp_path / "run").exists()


RUN_CASES = [
    ("total_steps", 0), ("save_every", 0), ("log_every", -1), ("keep_checkpoints", 0), ("total_steps", 2.5),
    ("data.global_batch_size", 0), ("data.text_len", 0), ("data.image_slots", -1), ("optim.image_lr", math.nan),
    ("optim.text_lr", -1e-4), ("optim.image_final_lr", math.inf), ("optim.accum_steps", 0),
    ("optim.accum_steps", 3), ("eval_every", -5),
]


@pytest.mark.parametrize("key,value", RUN_CASES, ids=[f"{k}={v}" for k, v in RUN_CASES])
def test_validate_run_config(key, value):
  from lmfusion_jax.models.config import ConfigError
  from lmfusion_jax.run_config import load_config, validate_run_config
  cfg = load_config("configs/tiny.py")
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(ConfigError) as e:
    validate_run_config(cfg)
  assert key in str(e.value)


@pytest.mark.parametrize("spec", ["configs/tiny.py", "configs/tiny.py:synthetic", "configs/demo_digits.py",
                                  "configs/demo_digits.py:ci", "configs/llama3_8b_lmfusion.py:v5p-128",
                                  "configs/llama3_8b_dense.py", "configs/llama3_8b_text.py:v5p-64",
                                  "configs/llava_next_8b_fusion.py:v5p-128", "configs/demo_mnist.py",
                                  "configs/demo_mnist.py:ci", "configs/demo_mnist.py:tok64",
                                  "configs/demo_mnist.py:noskip", "configs/demo_mnist.py:split_t",
                                  "configs/demo_mnist.py:shift4", "configs/demo_mnist.py:px16",
                                  "configs/demo_mnist.py:px8",
                                  "configs/demo_llava_digits.py", "configs/demo_llava_digits.py:ci"])
def test_shipped_configs_validate(spec):
  from lmfusion_jax.run_config import load_config, model_configs, validate_run_config
  cfg = load_config(spec)
  validate_run_config(cfg)
  model_configs(cfg)


# --- sample / generate / caption / eval ---------------------------------------------------------------------------
def sample_argv(env, *extra):
  return ["sample", "--checkpoint", env["ckpt"], "--tokenizer", env["tok"], "--prompt", "a seven",
          "--out", os.path.join(env["root"], "samples"), *extra]


@pytest.mark.parametrize("extra,flag", [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--cfg", "nan"], "--cfg"),
    (["--cfg", "inf"], "--cfg"), (["--num", "0"], "--num"), (["--sampler", "ddim", "--eta", "1.5"], "--eta"),
    (["--sampler", "ddim", "--eta", "-0.1"], "--eta"), (["--prompt", ""], "--prompt"),
    (["--eta", "0.5"], "--eta"), (["--clip-x0", "-1"], "--clip-x0")])
def test_sample_bad_flags(env, capsys, extra, flag):
  code, err = run_cli(sample_argv(env, *extra), capsys)
  assert_user_error(code, err, flag)
  assert not os.path.exists(os.path.join(env["root"], "samples"))


@pytest.mark.parametrize("command", ["sample", "caption", "generate"])
@pytest.mark.parametrize("kind", ["missing", "not_a_tokenizer"])
def test_bad_tokenizer_folder(env, capsys, command, kind):
  tok = os.path.join(env["root"], "no_such_tokenizer")
  if kind == "not_a_tokenizer":
    tok = os.path.join(env["root"], "not_a_tokenizer")
    os.makedirs(tok, exist_ok=True)
    open(os.path.join(tok, "tokenizer.json"), "w").write("garbage")
  out = os.path.join(env["root"], f"samples_{kind}")
  argv = {"sample": ["sample", "--prompt", "a seven", "--out", out],
          "caption": ["caption", "--image", os.path.join(env["root"], "x.png")],
          "generate": ["generate", "--prompt", "the"]}[command]
  code, err = run_cli(argv + ["--checkpoint", env["ckpt"], "--tokenizer", tok], capsys)
  assert_user_error(code, err, tok)
  assert not os.path.exists(out)


def generate_argv(env, *extra):
  return ["generate", "--checkpoint", env["ckpt"], "--tokenizer", env["tok"], "--prompt", "the seven", *extra]


@pytest.mark.parametrize("extra,flag", [
    (["--prompt", ""], "--prompt"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--max-new-tokens", "1000"], "--max-new-tokens")])
def test_generate_bad_flags(env, capsys, extra, flag):
  code, err = run_cli(generate_argv(env, *extra), capsys)
  assert_user_error(code, err, flag)


def test_caption_zero_tokens(env, capsys):
  code, err = run_cli(["caption", "--checkpoint", env["ckpt"], "--image", "x.png", "--max-new-tokens", "0"], capsys)
  assert_user_error(code, err, "--max-new-tokens")


@pytest.fixture
def fake_evaluate(monkeypatch):
  """evaluation.evaluate.evaluate replaced by a recorder: the refusals must come before any computing."""
  from lmfusion_jax.evaluation import evaluate as evaluate_lib
  calls = []
  monkeypatch.setattr(evaluate_lib, "evaluate", lambda *a, **k: calls.append(a) or {"text_nll": 1.5})
  monkeypatch.setattr(evaluate_lib, "to_json", lambda r: json.dumps(r))
  return calls


def test_eval_output_under_a_file_or_a_folder(env, capsys, fake_evaluate, tmp_path):
  (tmp_path / "a_file").write_text("x")
  for output in (tmp_path / "a_file" / "metrics.json", tmp_path):
    code, err = run_cli(["eval", "--checkpoint", env["ckpt"], "--output", output], capsys)
    assert_user_error(code, err, "--output", str(tmp_path))
  assert fake_evaluate == []


def test_eval_output_creates_missing_folders(env, capsys, fake_evaluate, tmp_path):
  output = tmp_path / "new" / "dir" / "metrics.json"
  code, err = run_cli(["eval", "--checkpoint", env["ckpt"], "--output", output], capsys)
  assert code == 0, err
  assert json.loads(output.read_text()) == {"text_nll": 1.5} and len(fake_evaluate) == 1
