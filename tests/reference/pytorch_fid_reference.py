"""pytorch-fid 0.3.0 as the independent reference for tests/test_inception_fid.py, run in its own process.

  PYTHONPATH=.reference python tests/reference/pytorch_fid_reference.py DIR

pytorch-fid needs torchvision, and PyPI's torchvision cannot be installed beside the CPU torch used here (its C++
ops fail to load, and transformers then refuses to import its models). So both live in `.reference/`
(`pip install --no-deps --upgrade --target .reference pytorch-fid==0.3.0 torchvision==0.28.0`, part of the
README's test command) and only this process sees them. The op registrations torchvision fails on are not used by
pytorch-fid and are replaced by empty modules.

DIR/job.json says what to compute; results are written to DIR:
  weights.pth           pytorch-fid's weight-file layout (torchvision Inception3 names + the 1008-way fc),
                        random convolutions, BN statistics estimated on real-looking images then perturbed
  features_K.npy        pool3 features [N, 2048] (float64 of the float32 network) of images_K.npy
                        (float32 [N, H, W, 3] in [0, 1]), for K in job["features"]
  png_stats.npz         mu, sigma of job["pngs"] by pytorch-fid's calculate_activation_statistics (batch 1)
  distance.json         {"distance": calculate_frechet_distance(stats_a.npz, stats_b.npz)} if job["distance"]
"""
import json
import os
import sys
import types

import numpy as np


def import_pytorch_fid():
  try:
    import torchvision  # noqa: F401
  except RuntimeError:   # 'operator torchvision::nms does not exist': the CUDA ops beside a CPU torch
    for m in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[m]
    for m in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules[m] = types.ModuleType(m)
  import pytorch_fid.fid_score as fid_score
  import pytorch_fid.inception as inception
  return inception, fid_score


def real_looking(seed: int, n: int, h: int, w: int) -> np.ndarray:
  """float32 [n, h, w, 3] in [0, 1]: smooth colour gradients, a few filled discs, mild noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  out = []
  for _ in range(n):
    a = rng.uniform(0, 1, (3, 3))
    img = a[:, 0] + a[:, 1] * yy[..., None] + 0.5 * a[:, 2] * xx[..., None]
    for _ in range(4):
      cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
      img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.uniform(0, 1, 3)
    img = img + rng.normal(0, 0.03, img.shape)
    out.append(np.clip(img / img.max(), 0, 1))
  return np.stack(out).astype(np.float32)


def random_state_dict(torch, torchvision, seed: int = 0) -> dict:
  g = torch.Generator().manual_seed(seed)
  layout = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                           init_weights=False).state_dict()
  sd = {}
  for k, v in layout.items():
    if k.endswith("conv.weight"):
      sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    elif k.endswith("bn.weight"):
      sd[k] = torch.rand(v.shape, generator=g) + 0.5
    elif k.endswith("bn.bias"):
      sd[k] = torch.randn(v.shape, generator=g) * 0.1
    elif k.endswith("num_batches_tracked"):
      sd[k] = v.clone()
    else:
      sd[k] = torch.randn(v.shape, generator=g) * 0.01
  return sd


def build_network(torch, inception, torchvision):
  """pytorch-fid's InceptionV3([3]) (FID blocks, resize to 299, input scaling) with random weights; BN running
  statistics re-estimated on real-looking images (a sane activation scale through all 94 units), then perturbed
  at random so a conversion error in any BN field shows. Returns (net in eval mode, weights in pytorch-fid's
  file layout)."""
  sd = random_state_dict(torch, torchvision)
  original = inception.load_state_dict_from_url
  inception.load_state_dict_from_url = lambda *a, **k: sd   # never downloads FID_WEIGHTS_URL
  try:
    net = inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
  finally:
    inception.load_state_dict_from_url = original
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(bns) == 94, len(bns)
  for m in bns:
    m.momentum = None
    m.reset_running_stats()
  net.train()
  with torch.no_grad():
    net(torch.from_numpy(real_looking(7, 4, 299, 299)).permute(0, 3, 1, 2))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in bns:
      m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.05 * m.running_var.sqrt())
  net.eval()
  blocks = [b for block in net.blocks for b in block
            if not isinstance(b, (torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d))]
  names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "Mixed_5b",
           "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
           "Mixed_7b", "Mixed_7c"]
  weights = {f"{n}.{k}": v.clone() for n, b in zip(names, blocks) for k, v in b.state_dict().items()}
  weights.update({k: sd[k] for k in ("fc.weight", "fc.bias")})
  assert set(weights) == set(sd)
  return net, weights


def main(out_dir: str) -> None:
  import torch
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  inception, fid_score = import_pytorch_fid()
  import torchvision
  with open(os.path.join(out_dir, "job.json")) as f:
    job = json.load(f)
  net, weights = build_network(torch, inception, torchvision)
  torch.save(weights, os.path.join(out_dir, "weights.pth"))
  for key in job.get("features", []):
    images = np.load(os.path.join(out_dir, f"images_{key}.npy"))
    with torch.no_grad():
      feats = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0]
    np.save(os.path.join(out_dir, f"features_{key}.npy"), feats.double().numpy())
  if job.get("pngs"):
    mu, sigma = fid_score.calculate_activation_statistics(job["pngs"], net, 1, 2048, "cpu", 0)
    np.savez(os.path.join(out_dir, "png_stats.npz"), mu=mu, sigma=sigma)
  if job.get("distance"):
    with np.load(os.path.join(out_dir, "stats_a.npz")) as a, np.load(os.path.join(out_dir, "stats_b.npz")) as b:
      d = fid_score.calculate_frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
    with open(os.path.join(out_dir, "distance.json"), "w") as f:
      json.dump({"distance": float(d)}, f)


if __name__ == "__main__":
  main(sys.argv[1])
