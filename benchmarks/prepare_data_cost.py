"""What preparing image-caption data costs: prepare-data measured on this machine, and the VAE encoder of the
paper's setting (sd-vae-ft-mse shape, 256x256 -> 32x32x4) estimated on a v5p chip, turned into hours for 380M
images on v5p-128 (64 chips) for the precompute path (prepare-data --vae-dir) and the online path
(--config.data.encode=online: the same encoder inside every train step).

  python benchmarks/prepare_data_cost.py [--images 384] [--batch-per-chip 64] [--skip-tpu]

(a) CPU, measured: a webdataset source of `--images` JPEGs (320x240, smooth random content, 4 shards) through
    `prepare_data` (decode, center crop, bicubic resize to 256, then PNG bytes / a tiny random VAE), one process;
    and the sd-vae-ft-mse-shaped encoder (random weights) on 4 images here.
(b) TPU, AOT estimate: the encoder compiled for one v5p chip from shapes (libtpu compile-only device), the batch
    `--batch-per-chip`; the compiler's FLOPs checked against planning.vae_encoder.encoder_flops.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

PAPER_IMAGES = 380e6
V5P_128_CHIPS = 64


def make_source(folder: str, n: int, shards: int = 4) -> str:
  import webdataset as wds
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  for s in range(shards):
    with wds.TarWriter(os.path.join(folder, f"{s:05d}.tar")) as w:
      for k in range(s, n, shards):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)       # smooth content: upsampled noise
        img = Image.fromarray(low).resize((320, 240), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        w.write({"__key__": f"k{k:06d}", "jpg": buf.getvalue(), "txt": f"picture number {k}".encode()})
  return os.path.join(folder, "{00000..%05d}.tar" % (shards - 1))


def timed_prepare(source: str, out: str, **kw) -> tuple:
  from lmfusion_jax.data.prepare import prepare_data
  t0 = time.perf_counter()
  summary = prepare_data(source, "webdataset", out, 256, **kw)
  return summary, time.perf_counter() - t0


def tiny_vae(folder: str) -> str:
  from flax import nnx
  from lmfusion_jax.checkpoints.vae import save_vae
  from lmfusion_jax.models.vae import AutoencoderKL, VAEConfig
  cfg = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)
  return str(save_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg, os.path.join(folder, "vae")))


def sd_encoder_on_cpu(n: int = 4) -> float:
  """images/s of the sd-vae-ft-mse-shaped encoder (random weights, float32) on this host, after a warm-up."""
  import jax
  from flax import nnx
  from lmfusion_jax.models.vae import AutoencoderKL, EncoderOnly, VAEConfig, encode_latents
  enc = EncoderOnly(AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(enc)
  fn = jax.jit(lambda st, x: encode_latents(nnx.merge(graphdef, st), x))
  x = np.random.default_rng(0).uniform(-1, 1, (n, 256, 256, 3)).astype(np.float32)
  fn(state, x).block_until_ready()
  t0 = time.perf_counter()
  fn(state, x).block_until_ready()
  return n / (time.perf_counter() - t0)


def tpu_rows(batch: int) -> list:
  from lmfusion_jax.models.vae import VAEConfig
  from lmfusion_jax.planning.topology import parse_topology, topology_devices
  from lmfusion_jax.planning.vae_encoder import encoder_cost
  devices = topology_devices(parse_topology("v5p:1x1x1"))
  return [(dtype, encoder_cost(VAEConfig(dtype=dtype), devices, 256, batch)) for dtype in ("float32", "bfloat16")]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=384)
  ap.add_argument("--batch-per-chip", type=int, default=64)
  ap.add_argument("--skip-tpu", action="store_true")
  a = ap.parse_args(argv)
  import jax
  load_before = os.getloadavg()[0]
  tmp = tempfile.mkdtemp(prefix="lmfusion-prepare-bench-")
  source = make_source(os.path.join(tmp, "shards"), a.images)
  cpu = []
  for name, kw in [("--encode none (PNG bytes for online encoding)", dict(encode="none")),
                   ("tiny random VAE (16-32-32-32 channels, 1 resnet per block) -> 32x32x4",
                    dict(vae_dir=tiny_vae(tmp), batch_size=16))]:
    summary, dt = timed_prepare(source, os.path.join(tmp, "out" + str(len(cpu))), **kw)
    cpu.append((name, summary["written"], dt))
  sd_cpu = sd_encoder_on_cpu()
  print(f"(a) CPU, measured on this host ({jax.local_device_count()} JAX CPU device, one process, {os.cpu_count()} "
        f"cores), {a.images} JPEGs 320x240 -> 256x256, whole-command wall time (start-up and compiles included); "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 = both cores busy)\n")
  print("| prepare-data | records written | seconds | images/s |")
  print("|---|---|---|---|")
  for name, n, dt in cpu:
    print(f"| {name} | {n} | {dt:.1f} | {n / dt:.1f} |")
  print(f"| sd-vae-ft-mse-shaped encoder alone (random weights, float32, batch 4) | 4 | {4 / sd_cpu:.1f} | "
        f"{sd_cpu:.2f} |")
  host_rate = cpu[0][1] / cpu[0][2]
  if a.skip_tpu:
    return
  rows = tpu_rows(a.batch_per_chip)
  print(f"\n(b) TPU v5p, AOT estimate: the sd-vae-ft-mse-shaped encoder (block_out_channels 128, 256, 512, 512; "
        f"2 resnets per block; mid-block attention at 32x32) on one chip, {a.batch_per_chip} images of 256x256 per "
        f"call, libtpu 0.0.42 cost model\n")
  print("| compute dtype | compiled FLOPs / image | analytic FLOPs / image | est. s per call | images/s per chip "
        "| HBM need | 380M images on v5p-128 (64 chips) |")
  print("|---|---|---|---|---|---|---|")
  for dtype, r in rows:
    hours = PAPER_IMAGES / (r["images_per_s_per_device"] * V5P_128_CHIPS) / 3600
    print(f"| {dtype} | {r['flops_per_image']:.4e} | {r['analytic_flops_per_image']:.4e} | {r['seconds']:.4f} | "
          f"{r['images_per_s_per_device']:.0f} | {r['hbm_need_bytes'] / 2 ** 30:.2f} GiB | {hours:.2f} h |")
  rate = rows[1][1]["images_per_s_per_device"]
  hours = PAPER_IMAGES / (rate * V5P_128_CHIPS) / 3600
  need_procs = rate * V5P_128_CHIPS / host_rate
  print(f"\nReading (bfloat16): **precompute** (`prepare-data --vae-dir`, every image encoded once): 380M images "
        f"take about **{hours:.1f} hours** of v5p-128 encoder time; the hosts must decode and resize "
        f"{rate * V5P_128_CHIPS:,.0f} images/s to keep up, i.e. about {need_procs:,.0f} processes like the one "
        f"measured here ({host_rate:.0f} images/s on {os.cpu_count()} cores: JPEG decode + crop + resize + PNG, the "
        f"none row; larger source JPEGs decode slower) spread over the pod's hosts.\n"
        f"**Online** (`--config.data.encode=online`): the same encoder FLOPs inside the train step, no backward "
        f"pass through it (the VAE is frozen and its input is data), so one pass over 380M images adds about "
        f"**{hours:.1f} hours** of v5p-128 time to training, and again each time an image is seen; the 8B config "
        f"encodes 256 x 4 = 1,024 images per step, {1024 / V5P_128_CHIPS:.0f} per chip: "
        f"{1024 / V5P_128_CHIPS / rate * 1e3:.1f} ms per step at this rate (`lmfusion-jax plan` shows the share "
        f"for the run's own mesh). Precompute pays it once and stores 32x32x4 float32 latents "
        f"({32 * 32 * 4 * 4 / 1024:.0f} KiB per image, {PAPER_IMAGES * 32 * 32 * 4 * 4 / 2 ** 40:.1f} TiB for 380M) "
        f"instead of the images.")


if __name__ == "__main__":
  main()
