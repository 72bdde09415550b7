"""Input pipeline throughput and packing efficiency, per process; prints a markdown table.

  python benchmarks/data_throughput.py [--data_dir DIR] [--batches 40] [--workers 0 2]

Measures make_train_iterator on the embedded digits dataset (8x8x1 latents) and on the synthetic
32x32x4-latent dataset, with 0 (threads only) and 2 worker processes: documents/s and packed rows/s
after the first batch (worker start-up excluded), and the fraction of text slots and image slots that
are padding.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


from lmfusion_jax.data import pipeline, synthetic, tfds_digits, tokenizer as tk

SETUPS = {
    # name: (dataset, config overrides)
    "digits 8x8x1": ("digits", dict(image_size=8, text_len=64, image_slots=2, tokens_per_image=16,
                                    global_batch_size=32)),
    "synthetic 32x32x4": ("synthetic", dict(image_size=32, synthetic_channels=4, text_len=128,
                                            image_slots=4, tokens_per_image=256, global_batch_size=16,
                                            synthetic_num_records=20_000)),
}


def measure(cfg, tok, batches: int) -> dict:
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  next(it)  # start-up (worker processes, first reads)
  start_counts = pipeline.counters(it)
  text_used = text_total = img_used = img_total = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    text_used += int((b["text_segment_ids"] > 0).sum())
    text_total += b["text_segment_ids"].size
    img_used += int((b["image_segment_ids"] > 0).sum())
    img_total += b["image_segment_ids"].size
  dt = time.perf_counter() - t0
  c = pipeline.counters(it)
  if hasattr(it, "close"):
    it.close()
  docs = c["documents"] - start_counts["documents"]
  rows = batches * cfg.global_batch_size
  return {"docs_per_s": docs / dt, "rows_per_s": rows / dt, "docs_per_row": docs / rows,
          "text_pad": 1 - text_used / text_total, "image_pad": 1 - img_used / img_total}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", default="", help="TFDS data dir (digits is built there if missing)")
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  args = ap.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="lmfusion-data-bench-")
  data_dir = args.data_dir or os.path.join(tmp, "tfds")
  tok = tk.train_tokenizer(tfds_digits.all_captions() * 20 + [" ".join(synthetic.WORDS)] * 20, 512,
                           os.path.join(tmp, "tokenizer"))
  rows = []
  for name, (dataset, overrides) in SETUPS.items():
    for workers in args.workers:
      cfg = pipeline.default_data_config()
      cfg.update(dict(dataset=dataset, data_dir=data_dir, num_workers=workers, **overrides))
      r = measure(cfg, tok, args.batches)
      rows.append((name, workers, cfg, r))
  print("| dataset | workers | row (text slots / image slots) | docs/s | rows/s | docs/row "
        "| text padding | image padding |")
  print("|---|---|---|---|---|---|---|---|")
  for name, workers, cfg, r in rows:
    print(f"| {name} | {workers} | {cfg.text_len} / {cfg.image_slots} x {cfg.tokens_per_image} tok "
          f"| {r['docs_per_s']:.0f} | {r['rows_per_s']:.0f} | {r['docs_per_row']:.2f} "
          f"| {100 * r['text_pad']:.1f}% | {100 * r['image_pad']:.1f}% |")


if __name__ == "__main__":
  main()
