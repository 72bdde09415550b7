"""`lmfusion-jax plan`: TPU topology names, AOT compiles for a TPU slice on this CPU host (needs libtpu,
the `tpu` extra), the compiled FLOPs against the analytic count, the per-layer cost extrapolation against a
fully unrolled compile, and the does-not-fit exit. Tiny models only; the linear image io compiles fastest. The three tests marked slow
share one 4-layer TPU compile and add two more (about 1 minute each on 2 busy cores)."""
import contextlib
import io
import json

import pytest

from lmfusion_jax import cli
from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.planning import cost, topology
from lmfusion_jax.run_config import apply_overrides, load_config
from lmfusion_jax.run_config import model_configs

# Slice shapes as Google's Cloud TPU documentation lists them (accelerator type -> chips, chip grid).
DOCUMENTED = {
    "v4-8": (4, (2, 2, 1)), "v4-16": (8, (2, 2, 2)), "v4-64": (32, (2, 4, 4)), "v4-128": (64, (4, 4, 4)),
    "v5p-8": (4, (2, 2, 1)), "v5p-64": (32, (2, 4, 4)), "v5p-128": (64, (4, 4, 4)),
    "v5p-256": (128, (4, 4, 8)), "v5p-512": (256, (4, 8, 8)), "v5p-1024": (512, (8, 8, 8)),
    "v5e-1": (1, (1, 1)), "v5e-4": (4, (2, 2)), "v5e-8": (8, (2, 4)), "v5litepod-16": (16, (4, 4)),
    "v5e-32": (32, (4, 8)), "v5e-64": (64, (8, 8)), "v5e-128": (128, (8, 16)), "v5e-256": (256, (16, 16)),
    "v6e-8": (8, (2, 4)), "v6e-64": (64, (8, 8)), "v6e-256": (256, (16, 16)),
}

# A model where matmuls dominate (dim 512, ffn 2048) but that compiles in seconds.
MATMUL_MODEL = ["--config.model.dim=512", "--config.model.ffn_dim=2048", "--config.model.n_heads=8",
                "--config.model.n_kv_heads=4", "--config.model.head_dim=64", "--config.model.n_layers=4",
                "--config.fusion.image_io=linear", "--config.data.text_len=96",
                "--config.data.global_batch_size=8"]


def run_cli(argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_topology_names_match_documented_slices(name):
  chips, grid = DOCUMENTED[name]
  topo = topology.parse_topology(name)
  assert topo.chips == chips and topo.chip_grid == grid


def test_topology_details_and_libtpu_devices():
  t = topology.parse_topology("v5p-128")
  assert t.libtpu_topology == "v5:4x4x4" and t.wrap == (True, True, True) and t.hbm_bytes == 95 * 2 ** 30
  assert topology.parse_topology("v5p-64").wrap == (False, False, False)
  assert topology.parse_topology("v5e-256").wrap == (True, True, False)
  assert topology.parse_topology("v5p:4x4x12").chips == 192
  assert [topology.parse_topology(n).hbm_bytes // 2 ** 30 for n in ("v4-8", "v5e-8", "v6e-8")] == [32, 16, 32]
  # libtpu's compile-only devices: one per chip (megacore on v4/v5p), of the right kind.
  for name, kind in (("v4-16", "TPU v4"), ("v5p-16", "TPU v5"), ("v5e-8", "TPU v5 lite"),
                     ("v6e-8", "TPU v6 lite")):
    topo = topology.parse_topology(name)
    devices = topology.topology_devices(topo)
    assert len(devices) == topo.chips and devices[0].device_kind == kind
  two = topology.topology_devices(topology.parse_topology("v5e-8"), num_slices=2)
  assert len(two) == 16 and {d.slice_index for d in two} == {0, 1}


@pytest.mark.parametrize("name,words", [("v5p-7", "even"), ("v7x-8", "unknown TPU generation"),
                                        ("v5e-12", "not a standard"), ("tpu-128", "expected e.g."),
                                        ("v5e:2x2x2", "2-D")])
def test_bad_topology_names(name, words):
  with pytest.raises(topology.PlanError, match=words):
    topology.parse_topology(name)


def test_mesh_over_slices_and_bad_meshes():
  tiny = lambda *overrides: apply_overrides(load_config("configs/tiny.py"), overrides)
  devices = topology.topology_devices(topology.parse_topology("v5e-8"), num_slices=2)
  mesh = topology.make_plan_mesh(tiny("--config.mesh.data=2").mesh, devices, num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
  # each data row of the mesh is one slice: data parallelism crosses DCN, fsdp stays inside a slice
  for row in mesh.devices.reshape(2, -1):
    assert len({d.slice_index for d in row}) == 1
  with pytest.raises(topology.PlanError, match="multiple of the slice count"):
    topology.make_plan_mesh(tiny().mesh, devices, num_slices=2)
  with pytest.raises(topology.PlanError, match="needs 24 devices"):
    topology.make_plan_mesh(tiny("--config.mesh.fsdp=3", "--config.mesh.tensor=8").mesh, devices[:8])


@pytest.fixture(scope="module")
def matmul_plan():
  """One `lmfusion-jax plan` run (unrolled layers: the run's compile carries the cost figures)."""
  code, out, err = run_cli(["plan", "--config", "configs/tiny.py", "--topology", "v5e-8", "--json"]
                           + MATMUL_MODEL)
  assert code == 0, err
  return json.loads(out)


@pytest.mark.slow
def test_plan_report_fits(matmul_plan):
  r = matmul_plan
  assert r["fits"] and r["chips"] == 8 and r["device_kind"] == "TPU v5 lite"
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["tokens_per_step"] == 8 * (96 + 2 * 16)
  assert 0 < r["hbm_need_bytes"] <= r["hbm_capacity_bytes"] == 16 * 2 ** 30
  m = r["memory"]
  assert r["hbm_need_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  # fp32 params sharded over 8 chips (fsdp on the embed axis); Adam keeps 2 moments of the image branch only
  cfg = apply_overrides(load_config("configs/tiny.py"), MATMUL_MODEL)
  lcfg, fcfg, _ = model_configs(cfg)
  text_params = lcfg.num_params()
  assert r["param_bytes_per_device"] >= 4 * text_params / 8
  assert r["opt_state_bytes_per_device"] < r["param_bytes_per_device"]
  assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
  assert 0 < r["mfu_required"] < r["mfu_maxtext"] < 1   # frozen text: fewer required FLOPs than MaxText counts
  assert 0 < r["hfu"] < 1


@pytest.mark.slow
def test_compiled_flops_match_analytic_count(matmul_plan):
  """XLA's FLOP count of the whole frozen-text step agrees with the analytic formula (4x weights per text
  token, 6x per image token, attention x3) within 5%."""
  cfg = apply_overrides(load_config("configs/tiny.py"), MATMUL_MODEL)
  lcfg, fcfg, _ = model_configs(cfg)
  analytic = flops_lib.train_step_flops(lcfg, fcfg, 8, 96, 2, text_trainable=False, attention="full")["total"]
  compiled = matmul_plan["compiled_flops_per_step"]
  assert abs(compiled / analytic - 1) < 0.05, (compiled, analytic)


@pytest.mark.slow
def test_scaled_cost_matches_unrolled_compile(matmul_plan):
  """Per-layer extrapolation from 2- and 3-layer compiles reproduces the 4-layer unrolled compile: FLOPs
  exactly (every layer is the same program), the compiler's time estimate closely."""
  cfg = apply_overrides(load_config("configs/tiny.py"), MATMUL_MODEL + ["--config.model.scan_layers=true"])
  devices = topology.topology_devices(topology.parse_topology("v5e-8"))
  mesh = topology.make_plan_mesh(cfg.mesh, devices)
  scaled = cost.step_cost(cfg, mesh, "scaled")
  unrolled_total = matmul_plan["compiled_flops_per_step"]
  assert scaled["flops"] * 8 == pytest.approx(unrolled_total, rel=0.01)
  assert scaled["optimal_seconds"] == pytest.approx(matmul_plan["step_time_s"], rel=0.1)


def test_plan_exits_1_when_it_does_not_fit():
  """16 rows of 4096 tokens per v5e chip with no remat: the attention scores kept for the backward pass
  alone exceed 16 GiB."""
  code, out, err = run_cli(["plan", "--config", "configs/tiny.py", "--topology", "v5e-8",
                            "--config.fusion.image_io=linear", "--config.model.max_seq_len=8192",
                            "--config.data.text_len=4064", "--config.data.global_batch_size=128",
                            "--config.model.n_layers=4"])
  assert code == 1, (out, err)
  assert "DOES NOT FIT" in out
  assert "does not fit" in err and "16.00 GiB" in err and "global_batch_size" in err


@pytest.mark.slow
def test_plan_with_the_flash_kernel_counts_its_cost(matmul_plan):
  """model.attention_impl=flash: the Pallas kernel compiles for the TPU target inside the real train step
  and the compiler counts its cost estimate. Compiled FLOPs = the analytic count with the kernel's one extra
  QK^T in the backward pass (attention 14 units instead of 12), within 5%. (Its speed-up shows at 8B
  sequence lengths, BENCHMARKS.md; at 128 tokens attention is a rounding error.)"""
  code, out, err = run_cli(["plan", "--config", "configs/tiny.py", "--topology", "v5e-8", "--json",
                            "--config.model.attention_impl=flash"] + MATMUL_MODEL)
  assert code == 0, err
  r = json.loads(out)
  cfg = apply_overrides(load_config("configs/tiny.py"), MATMUL_MODEL)
  lcfg, fcfg, _ = model_configs(cfg)
  analytic = flops_lib.train_step_flops(lcfg, fcfg, 8, 96, 2, text_trainable=False, attention="full")
  expected = analytic["total"] + analytic["attention"] * 2 / 12
  assert abs(r["compiled_flops_per_step"] / expected - 1) < 0.05, (r["compiled_flops_per_step"], expected)
  assert r["model_flops"] == matmul_plan["model_flops"]   # the MFU numerator does not depend on the kernel
  assert r["fits"] and r["step_time_s"] > 0
  assert "plan: compiling the train step (memory)" in err


def test_cost_below_the_required_flops_is_flagged():
  """A step cannot compute less than the analytic lower bound: such cost figures are flagged, not reported."""
  assert cost.cost_inconsistency(3.6e16, 4.2e16).startswith("cost figures inconsistent")
  assert cost.cost_inconsistency(5.6e16, 4.2e16) == ""
  assert cost.cost_inconsistency(None, 4.2e16) == ""


def _fsdp_conv_grad(mesh, batch, hw, channels):
  """Lowered gradient of a 3x3 SAME convolution, batch and output channels sharded over `mesh`'s one axis."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = jax.ShapeDtypeStruct((batch, hw, hw, channels), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  w = jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, None, None, "fsdp")))

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y.astype(jnp.float32) ** 2).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w)


def test_cost_compiles_count_every_windowed_einsum_step():
  """At large per-chip activations the TPU SPMD partitioner turns an FSDP convolution into a windowed-einsum
  loop whose body the cost analysis counts once. The plan's cost-compile options remove those loops: the
  compiled FLOPs then equal the convolution's multiply-add count (numpy formula), and the default compile is
  recognised as undercounted. The loop of a `scan` is not taken for one."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = topology.topology_devices(topology.parse_topology("v5p-16"))          # 8 chips
  mesh = Mesh(np.array(devices), ("fsdp",))
  batch, hw, channels = 64, 16, 768
  lowered = _fsdp_conv_grad(mesh, batch, hw, channels)
  # forward, input gradient and weight gradient: each one multiply-add per (output pixel, in-bounds tap,
  # in channel, out channel); a 3-tap SAME window over n pixels has 3n - 2 in-bounds taps.
  expected = 3 * 2 * (batch // len(devices)) * (3 * hw - 2) ** 2 * channels * channels
  default = cost._cost(lowered.compile())
  counted = cost._cost(lowered.compile(compiler_options=cost.COST_COMPILER_OPTIONS))
  assert default["windowed_einsum_loops"] > 0 and default["flops"] < 0.8 * expected, (default, expected)
  assert counted["windowed_einsum_loops"] == 0 and abs(counted["flops"] / expected - 1) < 0.01, (counted, expected)
  warning = cost.cost_inconsistency(default["flops"], 0.0, windowed_einsum_loops=default["windowed_einsum_loops"])
  assert warning.startswith("cost figures unreliable")

  def scanned(w, x):                                                      # 16 steps of [8,128] @ [128,128]
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
  rep = NamedSharding(mesh, P())
  scan_compiled = jax.jit(scanned).lower(jax.ShapeDtypeStruct((16, 128, 128), jnp.float32, sharding=rep),
                                         jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=rep)).compile()
  assert " while(" in scan_compiled.as_text()
  assert cost._cost(scan_compiled)["windowed_einsum_loops"] == 0


@pytest.mark.slow
def test_plan_search_picks_the_fastest_fitting_candidate():
  """--search plans each remat policy x accumulation candidate at the same global batch; the pick is the row with
  the smallest step-time estimate among those that fit, printed as a --config override line; a candidate whose
  accumulation does not split the rows per device is listed, not planned."""
  code, out, err = run_cli(["plan", "--config", "configs/tiny.py", "--topology", "v5e-8", "--json", "--search",
                            "--search-remat", "full,save_qkv_attn", "--search-accum", "1,3",
                            "--config.fusion.image_io=linear", "--config.data.global_batch_size=8"])
  assert code == 0, err
  r = json.loads(out)
  rows = {(x["remat_policy"], x["accum_steps"]): x for x in r["rows"]}
  assert set(rows) == {("full", 1), ("save_qkv_attn", 1), ("full", 3), ("save_qkv_attn", 3)}
  assert rows[("full", 3)]["fits"] is None and "do not split" in rows[("full", 3)]["note"]
  planned = [x for x in r["rows"] if x["fits"]]
  assert len(planned) == 2 and all(x["step_time_s"] > 0 and 0 < x["mfu_required"] < 1 for x in planned)
  best = min(planned, key=lambda x: x["step_time_s"])
  assert r["fastest"] == (f"--config.model.remat_policy={best['remat_policy']} "
                          f"--config.optim.accum_steps={best['accum_steps']}")
  assert "search: remat_policy=save_qkv_attn accum_steps=1" in err
