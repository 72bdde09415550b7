"""`plan --search`: the fastest configuration that fits, among remat policies x gradient accumulation.

  search(cfg, topology, policies, accum_steps, ...) -> [SearchRow]   (one full `plan` per candidate)
  fastest(rows) -> the fitting row with the smallest estimated step time

The global batch stays the run's: with A accumulation steps each device runs B / (data x fsdp x A) rows per
micro-step (fewer activations, more steps). A candidate whose accumulation does not split the per-device rows is
left out with that reason; one the compiler refuses (a policy it cannot lower here, e.g. host offload without
pinned host memory) is listed with the compiler's first line. Every figure is the TPU compiler's estimate on
this host. Each candidate is one memory compile plus, when it fits, the cost compiles (`--cost`): on a 2-core
host about 10-20 minutes per 8B candidate.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import ml_collections

from lmfusion_jax.models.config import REMAT_POLICIES
from lmfusion_jax.planning.topology import PlanError

DEFAULT_POLICIES = ("full", "save_qkv_proj", "save_qkv_attn", "save_out_proj", "dots_with_no_batch_dims_saveable",
                    "dots_saveable", "offload_qkv_attn")
DEFAULT_ACCUM = (1, 2, 4)


@dataclasses.dataclass
class SearchRow:
  remat_policy: str
  accum_steps: int
  rows_per_device: float       # rows per device per micro-step
  fits: Optional[bool]         # None: not planned (see note)
  hbm_need_bytes: Optional[int] = None
  step_time_s: Optional[float] = None
  mfu_required: Optional[float] = None
  mfu_maxtext: Optional[float] = None
  note: str = ""

  @property
  def overrides(self) -> str:
    return f"--config.model.remat_policy={self.remat_policy} --config.optim.accum_steps={self.accum_steps}"


def _candidate(cfg, policy: str, accum: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.model.remat_policy = policy
  c.optim.accum_steps = accum
  return c


def search(cfg, topology: str, policies: Sequence[str] = DEFAULT_POLICIES, accum_steps: Sequence[int] = DEFAULT_ACCUM,
           num_slices: int = 1, cost_mode: str = "scaled",
           progress: Callable[[str], None] = lambda msg: None) -> list[SearchRow]:
  from lmfusion_jax.planning.plan import plan
  from lmfusion_jax.planning.topology import make_plan_mesh, parse_topology, topology_devices
  unknown = [p for p in policies if p not in REMAT_POLICIES]
  if unknown:
    raise PlanError(f"--search-remat: unknown policy {unknown[0]!r} (known: {', '.join(REMAT_POLICIES)})")
  bad = [a for a in accum_steps if a < 1]
  if bad:
    raise PlanError(f"--search-accum: {bad[0]} must be >= 1")
  mesh = make_plan_mesh(cfg.mesh, topology_devices(parse_topology(topology), num_slices), num_slices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = int(cfg.data.global_batch_size)
  rows = []
  for accum in accum_steps:
    per_device = batch / shards / accum
    for policy in policies:
      if batch % (shards * accum):
        rows.append(SearchRow(policy, accum, per_device, None,
                              note=f"{batch} rows do not split into {shards} devices x {accum} micro-steps"))
        continue
      progress(f"search: remat_policy={policy} accum_steps={accum} ({per_device:g} rows per device)")
      try:
        r = plan(_candidate(cfg, policy, accum), topology, num_slices, cost_mode, progress)
      except Exception as e:   # a policy this compiler cannot lower (e.g. host offload): listed, not fatal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        rows.append(SearchRow(policy, accum, per_device, None, note=f"refused: {first[:160]}"))
        continue
      rows.append(SearchRow(policy, accum, per_device, r.fits, r.hbm_need_bytes, r.step_time_s, r.mfu_required,
                            r.mfu_maxtext, r.cost_warning or r.compiler_message[:160]))
  return rows


def fastest(rows: Sequence[SearchRow]) -> Optional[SearchRow]:
  ok = [r for r in rows if r.fits and r.step_time_s]
  return min(ok, key=lambda r: r.step_time_s) if ok else None


def format_search(rows: Sequence[SearchRow], topology: str) -> str:
  gib = lambda x: "n/a" if x is None else f"{x / 2 ** 30:.1f} GiB"  # noqa: E731
  pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
  lines = [f"plan --search on {topology} (the TPU compiler's estimates on this host)",
           "| remat_policy | accum_steps | rows/device | HBM need | fits | est. step time | MFU (required) | "
           "MFU (MaxText) | note |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    fits = "n/a" if r.fits is None else ("yes" if r.fits else "NO")
    step = "n/a" if not r.step_time_s else f"{r.step_time_s:.3f} s"
    lines.append(f"| {r.remat_policy} | {r.accum_steps} | {r.rows_per_device:g} | {gib(r.hbm_need_bytes)} | {fits} | "
                 f"{step} | {pct(r.mfu_required)} | {pct(r.mfu_maxtext)} | {r.note} |")
  best = fastest(rows)
  lines.append("")
  lines.append(f"fastest that fits: {best.overrides}  ({best.step_time_s:.3f} s, "
               f"MFU {pct(best.mfu_required)} required)" if best else "no candidate fits")
  return "\n".join(lines)
