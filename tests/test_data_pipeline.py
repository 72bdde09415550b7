"""The Grain pipeline: sharding over processes, epochs, rates, resume, workers, bad data, eval, global arrays."""
import json

import grain
import jax
import numpy as np
import pytest

from lmfusion_jax import sharding
from lmfusion_jax.data import packing, pipeline, synthetic, tokenizer as tk
from lmfusion_jax.data.batch import check_batch
from lmfusion_jax.data.batch import global_batch
from lmfusion_jax.data.sequences import BadRecordError

P_TOK = 4
IMG = -1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tk.train_tokenizer([" ".join(synthetic.WORDS)] * 50, 400, tmp_path_factory.mktemp("tok") / "t")


def cfg_for(**kw):
  cfg = pipeline.default_data_config()
  cfg.update(dict(dataset="synthetic", image_size=2, synthetic_channels=2, synthetic_num_records=50,
                  text_len=40, image_slots=3, tokens_per_image=P_TOK, global_batch_size=4, seed=5))
  cfg.update(kw)
  return cfg


def documents(batches):
  """All documents of all rows, in order (unpacked via segment ids and positions)."""
  return [d for b in batches for i in range(b["tokens"].shape[0])
          for d in packing.unpack_row({k: v[i] for k, v in b.items()}, P_TOK, image_token=IMG)]


def record_index(src, doc):
  """Which record a document came from: synthetic latents are unique random draws."""
  keys = {src[i]["latent"].tobytes(): i for i in range(len(src))}
  return keys[doc["images"][0].tobytes()]


def test_two_processes_see_every_record_once_per_epoch(tok):
  cfg = cfg_for(num_epochs=2)
  src, _ = pipeline.make_source(cfg, "train")
  per_process = []
  for pi in range(2):
    batches = list(pipeline.make_train_iterator(cfg, tok, process_index=pi, process_count=2))
    for b in batches:
      check_batch(b, cfg.text_len, cfg.image_slots)
      assert b["tokens"].shape[0] == 2                       # local batch = global 4 / 2 processes
    per_process.append([record_index(src, d) for d in documents(batches)])
  for pi in range(2):
    assert len(per_process[pi]) == 50                        # 25 records x 2 epochs
  for epoch in range(2):
    ep = [per_process[pi][epoch * 25:(epoch + 1) * 25] for pi in range(2)]
    assert not set(ep[0]) & set(ep[1])                       # disjoint between processes
    assert sorted(ep[0] + ep[1]) == list(range(50))          # every record exactly once per epoch
  assert per_process[0][:25] != per_process[0][25:]          # reshuffled each epoch

  # documents are exact: tokens match the record's caption, and the same example gets the same draws
  # whether the data is read by one process or two
  single = documents(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
  by_key = {}
  for epoch_docs in (single[:50], single[50:]):
    for d in epoch_docs:
      by_key.setdefault(record_index(src, d), []).append(d)
  for pi in range(2):
    docs = documents(pipeline.make_train_iterator(cfg, tok, process_index=pi, process_count=2))
    for j, d in enumerate(docs):
      r = record_index(src, d)
      ref = by_key[r][j // 25]
      np.testing.assert_array_equal(d["sequence"], ref["sequence"])
      ids = tok(src[r]["caption"], add_special_tokens=False)["input_ids"]
      text = [int(x) for x in d["sequence"] if x != IMG]
      if d["image_first"][0]:
        assert text in ([0, 2, 3] + ids + [1], [0, 2, 3, 1])    # BOS BOI EOI caption EOS (or dropped)
      else:
        assert text in ([0] + ids + [2, 3, 1], [0, 2, 3, 1])    # BOS caption BOI EOI EOS (or dropped)


def test_rates_end_to_end_10k(tok):
  cfg = cfg_for(synthetic_num_records=10_000, num_epochs=1, global_batch_size=64, text_len=64,
                image_slots=4, image_size=1, synthetic_channels=1)
  batches = list(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
  seg = np.concatenate([b["image_segment_ids"].ravel() for b in batches])
  first = np.concatenate([b["image_first"].ravel() for b in batches])[seg > 0]
  n = first.size
  assert n == 10_000
  dropped = 0
  for b in batches:
    for i in range(b["tokens"].shape[0]):
      counts = np.bincount(b["text_segment_ids"][i])[1:]
      dropped += int((counts == 4).sum())                    # BOS BOI EOI EOS only
  for rate, p in ((1 - first.mean(), 0.8), (dropped / n, 0.1)):
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), (rate, p)


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(tok, num_workers):
  # text-limited rows (3 image slots, short text): documents are regularly held back mid-row
  cfg = cfg_for(text_len=24, num_workers=num_workers, read_threads=1)
  ref_it = pipeline.make_train_iterator(cfg, tok, process_index=1, process_count=2)
  ref = [next(ref_it) for _ in range(12)]
  states = []
  it = pipeline.make_train_iterator(cfg, tok, process_index=1, process_count=2)
  for k in range(12):
    if k in ((3, 7) if num_workers == 0 else (5,)):
      states.append((k, json.loads(json.dumps(it.get_state()))))
    next(it)
  for k, state in states:
    fresh = pipeline.make_train_iterator(cfg, tok, process_index=1, process_count=2)
    fresh.set_state(state)
    _assert_same([next(fresh) for _ in range(12 - k)], ref[k:])
    assert pipeline.counters(fresh)["rows"] == 12 * 2          # rows counted across the restore
    if num_workers:
      fresh.close()
  if num_workers:
    # workers do not change the output: same batches as the in-process pipeline
    it0 = pipeline.make_train_iterator(cfg_for(text_len=24), tok, process_index=1, process_count=2)
    _assert_same([next(it0) for _ in range(12)], ref)
    ref_it.close()
    it.close()


def test_resume_mid_row_restores_held_back_document(tok):
  cfg = cfg_for(text_len=24)
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  pending_seen = 0
  for _ in range(6):
    next(it)
    pending_seen += pipeline.pack_stage.find_pack_iterator(it)._pending is not None
    fresh = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    _assert_same([next(fresh)], [next(it)])
  assert pending_seen >= 3


def test_orbax_checkpoint_round_trip(tok, tmp_path):
  import orbax.checkpoint as ocp
  cfg = cfg_for(text_len=24)
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    ref = [next(it) for _ in range(3)]
    fresh = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same([next(fresh) for _ in range(3)], ref)


BAD = {
    "latent_shape": {"id": "bad-shape", "caption": "a red cat", "latent": np.zeros((2, 3, 2), np.float32)},
    "latent_nonfinite": {"id": "bad-nan", "caption": "a red cat",
                         "latent": np.array([[[np.nan, 0]] * 2] * 2, np.float32)},
    "empty_caption": {"id": "bad-empty", "caption": "", "latent": np.zeros((2, 2, 2), np.float32)},
    "too_long": {"id": "bad-long", "caption": " ".join(["a red cat"] * 30),
                 "latent": np.zeros((2, 2, 2), np.float32)},
}


def _with_bad(reason):
  src = synthetic.SyntheticSource(num_records=12, image_size=2, channels=2, seed=1)
  records = [src[i] for i in range(12)]
  records.insert(5, BAD[reason])
  return records


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_record_error_names_it(tok, reason):
  cfg = cfg_for(num_epochs=1, shuffle=False, read_threads=0)
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1, source=_with_bad(reason),
                                    latent_shape=(2, 2, 2))
  with pytest.raises(BadRecordError, match=BAD[reason]["id"]):
    list(it)


def test_bad_records_skipped_and_counted(tok):
  records = _with_bad("latent_shape")
  for reason in ("latent_nonfinite", "empty_caption", "too_long"):
    records.insert(3, BAD[reason])
  cfg = cfg_for(num_epochs=2, on_bad_record="skip")
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1, source=records,
                                    latent_shape=(2, 2, 2))
  docs = documents(list(it))
  assert len(docs) == 2 * 12
  assert pipeline.counters(it)["skipped"] == {r: 2 for r in BAD}
  assert pipeline.counters(it)["documents"] == 24


def test_eval_iterator_in_order_without_dropout(tok):
  cfg = cfg_for(caption_dropout=1.0, eval_order="caption_first", eval_split="test")
  src, _ = pipeline.make_source(cfg, "test")
  batches = list(pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1))
  docs = documents(batches)
  assert [record_index(src, d) for d in docs] == list(range(50))
  for i, d in enumerate(docs):
    ids = tok(src[i]["caption"], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(d["sequence"], [0] + ids + [2] + [IMG] * P_TOK + [3, 1])
  fixed = list(pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1,
                                           num_batches=len(batches) + 2))
  _assert_same(fixed[:len(batches)], batches)
  for b in fixed[len(batches):]:
    check_batch(b, cfg.text_len, cfg.image_slots)
    assert not b["text_segment_ids"].any() and not b["image_segment_ids"].any()


def test_global_batch_shards_over_data_and_fsdp(tok):
  cfg = cfg_for(global_batch_size=8)
  host = next(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
  mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
  out = global_batch(host, mesh)
  assert out.keys() == host.keys()
  for k, v in out.items():
    assert v.shape == host[k].shape and v.dtype == host[k].dtype
    assert v.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), *([None] * (v.ndim - 1)))
    np.testing.assert_array_equal(np.asarray(v), host[k])
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 1
  with pytest.raises(ValueError, match="tokens"):
    global_batch({"tokens": host["tokens"][:3]}, mesh)
