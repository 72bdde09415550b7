"""convert-llama / export-llama and the params checkpoint: exact tensor mapping against a hand-written
reference, bitwise HF -> ours -> HF round trips (fp32, bf16, sharded input), restore on other meshes, the
image branch, and bad input (clear error, exit code != 0, nothing left behind)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lmfusion_jax import cli, sharding
from lmfusion_jax.checkpoints import params as params_io
from lmfusion_jax.convert import llama_checkpoint
from lmfusion_jax.models import sharded
from lmfusion_jax.convert import hf_llama
from lmfusion_jax.models import fusion
from lmfusion_jax.models.config import FusionConfig

from hf_models import VOCAB, make_hf_llama


def read_all_safetensors(path):
  """{name: (dtype string, raw bytes, shape)} for every tensor of a HF folder."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), framework="numpy") as st:
        for name in st.keys():
          a = st.get_tensor(name)
          out[name] = (str(a.dtype), a.tobytes(), a.shape)
  return out


def run_cli(*argv):
  return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_fp32")
  return make_hf_llama(path), path


@pytest.fixture(scope="module")
def hf_bf16_sharded(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_bf16")
  model = make_hf_llama(path, dtype=torch.bfloat16, seed=1, max_shard_size="40KB", tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
  assert (path / hf_llama.INDEX_FILE).exists() and len(list(path.glob("*.safetensors"))) > 2
  return model, path


@pytest.fixture(scope="module")
def converted(hf_fp32, tmp_path_factory):
  _, path = hf_fp32
  out = tmp_path_factory.mktemp("ckpt") / "llama"
  assert run_cli("convert-llama", "--hf-dir", path, "--out", out, "--text-only") == 0
  return out


def test_converted_leaves_follow_the_hf_layout(hf_fp32, converted):
  """Reference mapping written out by hand: q = q_proj.weight.T reshaped [embed, heads, head_dim], etc."""
  model, _ = hf_fp32
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  text = jax.tree.map(np.asarray, params_io.load_params(converted, subtree="text"))
  d, h, kvh, hd, n = 64, 4, 2, 16, 2
  layer = lambda i, k: sd[f"model.layers.{i}.{k}"]
  want = {
      "embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
      "lm_head": sd["lm_head.weight"].T,
      "layers": {
          "attn_norm": np.stack([layer(i, "input_layernorm.weight") for i in range(n)]),
          "ffn_norm": np.stack([layer(i, "post_attention_layernorm.weight") for i in range(n)]),
          "q": np.stack([layer(i, "self_attn.q_proj.weight").T.reshape(d, h, hd) for i in range(n)]),
          "k": np.stack([layer(i, "self_attn.k_proj.weight").T.reshape(d, kvh, hd) for i in range(n)]),
          "v": np.stack([layer(i, "self_attn.v_proj.weight").T.reshape(d, kvh, hd) for i in range(n)]),
          "o": np.stack([layer(i, "self_attn.o_proj.weight").T.reshape(h, hd, d) for i in range(n)]),
          "gate": np.stack([layer(i, "mlp.gate_proj.weight").T for i in range(n)]),
          "up": np.stack([layer(i, "mlp.up_proj.weight").T for i in range(n)]),
          "down": np.stack([layer(i, "mlp.down_proj.weight").T for i in range(n)]),
      }}
  assert jax.tree.structure(text) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, text, want)
  cfg, fcfg = params_io.read_model_config(converted)
  assert fcfg is None and cfg.param_dtype == "float32" and (cfg.n_layers, cfg.n_kv_heads) == (2, 2)


@pytest.mark.parametrize("source", ["fp32_single_file", "bf16_sharded_tied_llama3"])
def test_round_trip_is_bitwise(source, hf_fp32, hf_bf16_sharded, tmp_path):
  model, path = hf_fp32 if source.startswith("fp32") else hf_bf16_sharded
  ckpt, back = tmp_path / "ckpt", tmp_path / "hf_back"
  assert run_cli("convert-llama", "--hf-dir", path, "--out", ckpt, "--text-only") == 0
  assert run_cli("export-llama", "--checkpoint", ckpt, "--out", back, "--max-shard-size", "30KB") == 0
  original, exported = read_all_safetensors(path), read_all_safetensors(back)
  assert sorted(original) == sorted(exported)
  for name in original:
    assert original[name] == exported[name], name  # dtype, bytes and shape
  # the exported config means the same model: identical logits from both folders
  reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
  original_model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
  assert reloaded.dtype == original_model.dtype == model.dtype
  tokens = torch.tensor(np.random.RandomState(0).randint(0, VOCAB, (2, 12)))
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, original_model(tokens).logits)
  hf_cfg = json.loads((back / "config.json").read_text())
  assert hf_cfg["rope_parameters"]["rope_type"] == ("default" if source.startswith("fp32") else "llama3")


def test_dtype_flag_casts(hf_fp32, tmp_path):
  _, path = hf_fp32
  assert run_cli("convert-llama", "--hf-dir", path, "--out", tmp_path / "c", "--text-only",
                 "--dtype", "bfloat16") == 0
  q = params_io.load_params(tmp_path / "c", subtree="text/layers/q")
  assert q.dtype == jnp.bfloat16
  assert params_io.read_model_config(tmp_path / "c")[0].param_dtype == "bfloat16"


def test_restore_on_other_meshes(converted, tmp_path):
  """A checkpoint written from arrays sharded on an 8-device mesh restores on 1 device and on a 2x2 mesh,
  each leaf sharded as the logical-axis rules say for the new mesh."""
  cfg, _ = params_io.read_model_config(converted)
  text = params_io.load_params(converted, subtree="text")
  mesh8 = sharding.make_mesh(fsdp=4, tensor=2)
  sh8 = sharded.model_shardings(cfg, None, mesh8)
  on8 = {"text": jax.tree.map(jax.device_put, text, sh8["text"])}
  assert on8["text"]["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  params_io.save_params(tmp_path / "resaved", on8, cfg)
  for mesh in (sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]),
               sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[4:8])):
    restored = params_io.load_params(tmp_path / "resaved", mesh=mesh)
    want = sharded.model_shardings(cfg, None, mesh)
    for leaf, ref, s in zip(jax.tree.leaves(restored["text"]), jax.tree.leaves(text),
                            jax.tree.leaves(want["text"])):
      assert leaf.sharding == s
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
  with pytest.raises(params_io.CheckpointError, match="already exists"):
    params_io.save_params(tmp_path / "resaved", on8, cfg)


def test_image_branch_is_initialized_from_text(hf_fp32, tmp_path):
  _, path = hf_fp32
  out = tmp_path / "fused"
  assert run_cli("convert-llama", "--hf-dir", path, "--out", out, "--separation", "shallow",
                 "--image-io", "linear", "--latent-size", "8", "--latent-channels", "4",
                 "--boi-id", "250", "--eoi-id", "251", "--seed", "3") == 0
  cfg, fcfg = params_io.read_model_config(out)
  assert fcfg == FusionConfig(separation="shallow", image_io="linear", latent_size=8, latent_channels=4,
                              boi_id=250, eoi_id=251)
  params = params_io.load_params(out)
  want = fusion.init_image_params(cfg, fcfg, params["text"], seed=3)
  assert jax.tree.structure(params["image"]) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params["image"], want)
  assert sorted(params["image"]["layers"]) == ["down", "ffn_norm", "gate", "up"]
  # export takes the text branch only and still round-trips exactly
  assert run_cli("export-llama", "--checkpoint", out, "--out", tmp_path / "hf") == 0
  orig, back = read_all_safetensors(path), read_all_safetensors(tmp_path / "hf")
  assert orig == back


def test_read_box_matches_slicing_the_whole_leaf(hf_fp32):
  """Any box of our layout read from only the HF parts it covers (rows for copies, an [out, in] rectangle
  or its gathered entries for linears) equals that box of the whole leaf read directly."""
  _, path = hf_fp32
  cfg, text = hf_llama.load_hf_text_params(path)
  flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(text)[0]}
  ckpt = hf_llama.HFCheckpoint(path)
  rng = np.random.RandomState(0)
  for rule in hf_llama.text_rules(cfg):
    leaf = flat[rule.ours]
    for _ in range(6):
      box = []
      for n in leaf.shape:
        a, b = sorted(rng.choice(n + 1, 2, replace=False))
        box.append(slice(int(a), int(b)))
      box = tuple(box)
      got = ckpt.read_box(rule, cfg, box, "float32")
      np.testing.assert_array_equal(got, leaf[box], err_msg=f"{rule.ours} {box}")


@pytest.mark.parametrize("source", ["fp32_single_file", "bf16_sharded_tied_llama3"])
def test_small_chunks_restore_bitwise(source, hf_fp32, hf_bf16_sharded, tmp_path):
  """Tiny stored chunks force every leaf to be written in many chunk-sized pieces (boxes that split inner
  dims too); the checkpoint still restores bitwise equal to reading the HF files whole, also sharded on a
  mesh, and the image copies (written from the same pieces) equal the text weights."""
  _, path = hf_fp32 if source.startswith("fp32") else hf_bf16_sharded
  out = tmp_path / "ckpt"
  fcfg = FusionConfig(separation="deep", image_io="linear", latent_size=8, latent_channels=4, boi_id=250,
                      eoi_id=251)
  llama_checkpoint.convert(path, out, fusion_cfg=fcfg, seed=3, chunk_bytes=512)
  cfg, want = hf_llama.load_hf_text_params(path)
  stored = params_io.stored_metadata(out)
  embed_chunk = stored["text"]["embed"].storage_metadata.chunk_shape
  q_chunk = stored["text"]["layers"]["q"].storage_metadata.chunk_shape
  assert tuple(embed_chunk) != tuple(stored["text"]["embed"].shape)
  assert sum(a != b for a, b in zip(q_chunk, stored["text"]["layers"]["q"].shape)) >= 2, q_chunk
  params = params_io.load_params(out)
  bits = lambda x: np.asarray(x).view(np.uint8)
  assert jax.tree.structure(params["text"]) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(params["text"]), jax.tree.leaves(want)):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(bits(got), bits(ref))
  for k in ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down"):
    np.testing.assert_array_equal(bits(params["image"]["layers"][k]), bits(want["layers"][k]))
  embed = np.asarray(want["embed"]).astype(np.float64)
  rms = np.float32(np.sqrt(np.mean(np.square(embed))))  # numpy reference for the image tokens' scale
  ref_image = fusion.init_image_params(cfg, fcfg, params["text"], seed=3, text_embed_rms=rms)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params["image"], ref_image)
  mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  on_mesh = params_io.load_params(out, mesh=mesh, subtree="text")
  shardings = sharded.model_shardings(cfg, fcfg, mesh)["text"]
  for got, ref, s in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(want), jax.tree.leaves(shardings)):
    assert got.sharding == s
    np.testing.assert_array_equal(bits(got), bits(ref))


# --- bad input -------------------------------------------------------------------------------------------
def _copy_hf(src, dst, edit_tensors=None, edit_config=None):
  dst.mkdir()
  tensors = load_file(str(src / "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  cfg = json.loads((src / "config.json").read_text())
  if edit_config:
    edit_config(cfg)
  (dst / "config.json").write_text(json.dumps(cfg))


BAD_INPUTS = {
    "missing_tensor": (dict(edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "model.layers.1.mlp.up_proj.weight"),
    "wrong_shape": (dict(edit_tensors=lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                             np.zeros((16, 64), np.float32))),
                    "model.layers.0.self_attn.k_proj.weight"),
    "unknown_rope_type": (dict(edit_config=lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})), "yarn"),
    "unexpected_tensor": (dict(edit_tensors=lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                                                   np.zeros((64,), np.float32))),
                          "model.layers.0.self_attn.q_proj.bias"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS) + ["no_safetensors"])
def test_bad_input_fails_cleanly(case, hf_fp32, tmp_path, capsys):
  _, src = hf_fp32
  bad = tmp_path / "bad_hf"
  if case == "no_safetensors":
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    needle = "no *.safetensors"
  else:
    edits, needle = BAD_INPUTS[case]
    _copy_hf(src, bad, **edits)
  out = tmp_path / "out" / "ckpt"
  rc = run_cli("convert-llama", "--hf-dir", bad, "--out", out, "--boi-id", "250", "--eoi-id", "251",
               "--image-io", "linear", "--latent-size", "8")
  err = capsys.readouterr().err
  assert rc != 0
  assert needle in err, err
  assert not out.exists()
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_failure_midway_leaves_nothing(hf_fp32, tmp_path, monkeypatch):
  _, src = hf_fp32
  calls = {"n": 0}
  real_read = hf_llama.HFCheckpoint.read_slice

  def flaky_read(self, name, index):
    calls["n"] += 1
    if calls["n"] == 7:
      raise OSError(f"simulated read failure at {name}")
    return real_read(self, name, index)

  monkeypatch.setattr(hf_llama.HFCheckpoint, "read_slice", flaky_read)
  with pytest.raises(OSError, match="simulated"):
    llama_checkpoint.convert(src, tmp_path / "ckpt")
  assert calls["n"] == 7
  assert list(tmp_path.iterdir()) == []


def test_bad_fusion_ids_and_existing_output(hf_fp32, converted, tmp_path, capsys):
  _, src = hf_fp32
  assert run_cli("convert-llama", "--hf-dir", src, "--out", tmp_path / "x") != 0  # default boi 128002
  assert "--boi-id=128002" in capsys.readouterr().err and not (tmp_path / "x").exists()
  assert run_cli("convert-llama", "--hf-dir", src, "--out", converted, "--text-only") != 0
  assert "already exists" in capsys.readouterr().err
  assert run_cli("export-llama", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "hf") != 0
  assert "nope" in capsys.readouterr().err and not (tmp_path / "hf").exists()
