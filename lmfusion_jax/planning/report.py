"""The plan as text: `format_report(PlanReport)` and the does-not-fit message."""
from __future__ import annotations

from lmfusion_jax.planning.plan import PlanReport
from lmfusion_jax.planning.topology import GIB


def _gib(x: float) -> str:
  return f"{x / GIB:.2f} GiB" if abs(x) >= 0.1 * GIB else f"{x / 2 ** 20:.1f} MiB"


def _pct(x) -> str:
  return "n/a" if x is None else f"{x:.1%}"


def format_report(r: PlanReport) -> str:
  m = r.memory
  lines = [
      f"plan: {r.topology} ({r.libtpu_topology}) x {r.num_slices} slice(s) = {r.chips} chips [{r.device_kind}], "
      f"mesh {r.mesh}",
      f"  batch: {r.global_batch} sequences, {r.tokens_per_step:,} tokens per step",
      f"  HBM per chip: need {_gib(r.hbm_need_bytes)} of {_gib(r.hbm_capacity_bytes)} "
      f"({r.hbm_need_bytes / r.hbm_capacity_bytes:.0%}) -> {'fits' if r.fits else 'DOES NOT FIT'}",
      f"    arguments {_gib(m['argument'])} + outputs {_gib(m['output'])} - aliased {_gib(m['alias'])} "
      f"+ temporaries {_gib(m['temp'])} + code {_gib(m['generated_code'])}",
      f"    parameters {_gib(r.param_bytes_per_device)}, optimizer state {_gib(r.opt_state_bytes_per_device)}"
      f" per chip",
  ]
  if r.compiler_message:
    lines.append(f"    (the TPU compiler refused the program: {r.compiler_message})")
  if r.cost_warning:
    lines.append(f"  WARNING: {r.cost_warning}")
  mf = r.model_flops
  if r.compiled_flops_per_step is not None:
    lines.append(f"  FLOPs per step: compiled {r.compiled_flops_per_step:.4g} ({r.cost_source}); model "
                 f"MaxText convention {mf['maxtext']:.4g}, required {mf['required']:.4g} "
                 f"(causal attention {mf['attention']:.4g})")
  if r.step_time_s:
    lines.append(f"  step time (compiler estimate): {r.step_time_s:.3f} s -> {r.tokens_per_s:,.0f} tokens/s, "
                 f"{r.tokens_per_s / r.chips:,.0f} tokens/s/chip")
    if r.per_layer_seconds:
      layers = r.per_layer_seconds * r.n_layers
      lines.append(f"    of which the {r.n_layers} layers {layers:.3f} s ({r.per_layer_seconds * 1e3:.1f} ms each); the "
                   f"rest (embedding, LM head, loss, image in/out, optimizer) {r.step_time_s - layers:.3f} s")
    lines.append(f"  MFU estimate: {_pct(r.mfu_required)} (required FLOPs), {_pct(r.mfu_maxtext)} (MaxText's "
                 f"convention); hardware FLOPs utilization {_pct(r.hfu)} "
                 f"(peak {r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip)")
    lines.append("  (all figures: the TPU compiler's estimates on this host, not TPU measurements)")
  elif r.fits and not r.cost_warning:
    lines.append("  step time: the compiler gave no estimate for this target")
  if r.encoder:
    lines += _encoder_lines(r)
  return "\n".join(lines)


def _encoder_lines(r: PlanReport) -> list:
  e = r.encoder
  crop = f", random {e['crop_size']}px crops" if e["crop_size"] else ""
  out = [f"  online encoding (data.encode=online): VAE encoder {tuple(e['block_out_channels'])} from {e['vae']}, "
         f"{e['images_per_step']} images of {e['image_size']}x{e['image_size']}{crop} per step "
         f"({e['images_per_chip']:g} per chip); {e['source']}"]
  if e["seconds"]:
    share = (f"; step + encoder {r.step_time_s + e['seconds']:.3f} s, encoder share {r.encoder_share:.1%}"
             if r.encoder_share is not None else "")
    out.append(f"    encoder (compiler estimate): {e['seconds'] * 1e3:.1f} ms per step, "
               f"{e['flops_per_step']:.4g} FLOPs per step{share}")
  else:
    out.append("    encoder: the compiler gave no time estimate for this target")
  if e["temp_bytes"] is not None:
    out.append(f"    encoder memory per chip (not in the HBM figure above): temporaries {_gib(e['temp_bytes'])}, "
               f"parameters {_gib(e['param_bytes_per_chip'])} (replicated)")
  return out


def not_fit_message(r: PlanReport) -> str:
  return (f"does not fit: the step needs {_gib(r.hbm_need_bytes)} of HBM per chip but a {r.topology} chip "
          f"has {_gib(r.hbm_capacity_bytes)} (temporaries {_gib(r.memory['temp'])}, parameters "
          f"{_gib(r.param_bytes_per_device)}, optimizer state {_gib(r.opt_state_bytes_per_device)}). "
          f"Lower data.global_batch_size (or raise optim.accum_steps), use model.remat_policy=full, shard "
          f"more (mesh.fsdp / mesh.tensor), or take a larger slice.")
