"""planning/sampling.py: the real denoising step and caption prefill compiled for a TPU slice from shapes only
(libtpu compile-only devices); their compiled FLOPs agree with the analytic counts (numpy-free formulas of
weights, attention and the image in/out modules), and rows that do not split over the mesh are refused."""
import pytest

from lmfusion_jax.planning import flops as flops_lib
from lmfusion_jax.planning import sampling as sp
from lmfusion_jax.planning.topology import PlanError, make_plan_mesh, parse_topology, topology_devices
from lmfusion_jax.run_config import apply_overrides, load_config, model_configs


def test_sampling_step_and_prefill_flops_match_the_analytic_counts():
  cfg = apply_overrides(load_config("configs/tiny.py"), ["--config.fusion.image_io=linear"])
  lcfg, fcfg, dcfg = model_configs(cfg)
  mesh = make_plan_mesh(cfg.mesh, topology_devices(parse_topology("v5e-8")), 1)
  shape = sp.SamplingShape(prompts=8, prefix_len=16, guided=True)
  io = flops_lib.image_io_flops_per_image(lcfg, fcfg)
  step = sp.program_cost(lambda l: sp.lower_denoise(l, fcfg, dcfg, mesh, shape), lcfg, mesh, "unrolled")
  want = sp.denoise_step_flops(lcfg, fcfg, shape.rows, shape.prefix_len, io)["total"]
  assert abs(step["flops"] * 8 / want - 1) < 0.1, (step["flops"] * 8, want)
  assert step["optimal_seconds"] > 0
  pre = sp.program_cost(lambda l: sp.lower_prefill(l, mesh, shape), lcfg, mesh, "unrolled")
  want = sp.prefill_flops(lcfg, shape.rows, shape.prefix_len)["total"]
  assert abs(pre["flops"] * 8 / want - 1) < 0.1, (pre["flops"] * 8, want)
  with pytest.raises(PlanError, match="do not split"):
    sp.lower_denoise(lcfg, fcfg, dcfg, mesh, sp.SamplingShape(prompts=3, prefix_len=16, guided=True))
