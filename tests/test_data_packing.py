"""Document layout and packing: hand-computed layouts, exact round trips, next-fit, draw rates."""
import numpy as np
import pytest

from lmfusion_jax.data import packing, sequences, synthetic, tokenizer as tk
from lmfusion_jax.data.batch import check_batch

SPECIAL = {"bos": 0, "eos": 1, "boi": 2, "eoi": 3, "pad": 4}
IMG = -1  # image position marker used by unpack_row


def test_layout_caption_first_hand_computed():
  lat = np.ones((2, 2, 1), np.float32)
  d = sequences.layout_document("r", [10, 11], lat, caption_first=True, special=SPECIAL, tokens_per_image=3)
  # BOS c c BOI [img img img] EOI EOS  at positions 0 1 2 3 [4 5 6] 7 8
  np.testing.assert_array_equal(d.tokens, [0, 10, 11, 2, 3, 1])
  np.testing.assert_array_equal(d.text_positions, [0, 1, 2, 3, 7, 8])
  np.testing.assert_array_equal(d.targets, [10, 11, 2, 0, 1, 0])
  np.testing.assert_array_equal(d.loss_mask, [1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(d.image_positions, [4])
  np.testing.assert_array_equal(d.image_first, [False])


def test_layout_image_first_hand_computed():
  lat = np.ones((2, 2, 1), np.float32)
  d = sequences.layout_document("r", [10, 11], lat, caption_first=False, special=SPECIAL, tokens_per_image=3)
  # BOS BOI [img img img] EOI c c EOS  at positions 0 1 [2 3 4] 5 6 7 8
  np.testing.assert_array_equal(d.tokens, [0, 2, 3, 10, 11, 1])
  np.testing.assert_array_equal(d.text_positions, [0, 1, 5, 6, 7, 8])
  np.testing.assert_array_equal(d.targets, [2, 0, 10, 11, 1, 0])
  np.testing.assert_array_equal(d.loss_mask, [1, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(d.image_positions, [2])
  np.testing.assert_array_equal(d.image_first, [True])


def test_layout_dropped_caption():
  lat = np.ones((2, 2, 1), np.float32)
  d = sequences.layout_document("r", [], lat, caption_first=True, special=SPECIAL, tokens_per_image=2)
  np.testing.assert_array_equal(d.tokens, [0, 2, 3, 1])           # BOS BOI [img img] EOI EOS
  np.testing.assert_array_equal(d.text_positions, [0, 1, 4, 5])
  np.testing.assert_array_equal(d.targets, [2, 0, 1, 0])
  np.testing.assert_array_equal(d.loss_mask, [1, 0, 1, 0])


def expected_sequence(caption_ids, caption_first, p):
  """Independent reference for a document's full token sequence (IMG on image positions)."""
  if caption_first:
    return [0] + list(caption_ids) + [2] + [IMG] * p + [3, 1]
  return [0, 2] + [IMG] * p + [3] + list(caption_ids) + [1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tk.train_tokenizer([" ".join(synthetic.WORDS)] * 50, 400, tmp_path_factory.mktemp("tok") / "t")


def test_pack_round_trip_is_exact(tok):
  p, t_len, slots = 4, 48, 3
  src = synthetic.SyntheticSource(num_records=60, image_size=2, channels=3, seed=1)
  spec = sequences.SequenceSpec(text_len=t_len, image_slots=slots, tokens_per_image=p,
                                latent_shape=src.latent_shape, caption_dropout=0.3)
  special = tk.special_ids(tok)
  assert special == {"bos": 0, "eos": 1, "boi": 2, "eoi": 3, "pad": 4}  # what expected_sequence assumes
  encode = tk.CaptionEncoder(tok)
  docs = [sequences.build_document(src[i], encode, spec, special, seed=7, example_index=i) for i in range(60)]
  rows = list(packing.pack_documents(docs, t_len, slots, src.latent_shape))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  check_batch(batch, t_len, slots)

  out = [d for r in rows for d in packing.unpack_row(r, p, image_token=IMG)]
  assert len(out) == 60                                     # nothing lost or duplicated, order kept
  n_dropped = 0
  for i, d in enumerate(out):
    rec = src[i]
    ids = tok(rec["caption"], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(d["images"], rec["latent"][None])
    caption_first = not d["image_first"][0]
    text = [x for x in d["sequence"] if x != IMG]
    dropped = len(text) == 4
    n_dropped += dropped
    want = expected_sequence([] if dropped else ids, caption_first, p)
    np.testing.assert_array_equal(d["sequence"], want)
    # targets: next position's token when it is text, else 0 (numpy formula on the sequence)
    seq = np.asarray(want)
    text_pos = np.nonzero(seq != IMG)[0]
    nxt = np.append(seq, IMG)[text_pos + 1]
    np.testing.assert_array_equal(d["targets"], np.where(nxt != IMG, nxt, 0))
    np.testing.assert_array_equal(d["loss_mask"], (nxt != IMG).astype(np.float32))
  assert 0 < n_dropped < 60

  # next-fit: a row is closed only when the following document does not fit in what is left
  for r, nxt_row in zip(rows[:-1], rows[1:]):
    text_left = t_len - int((r["text_segment_ids"] > 0).sum())
    img_left = slots - int((r["image_segment_ids"] > 0).sum())
    first = nxt_row["text_segment_ids"] == 1
    assert int(first.sum()) > text_left or img_left < 1
  # padding is zero everywhere
  for r in rows:
    pad = r["text_segment_ids"] == 0
    assert not r["tokens"][pad].any() and not r["loss_mask"][pad].any()
    ipad = r["image_segment_ids"] == 0
    assert not r["latents"][ipad].any()


def test_document_that_can_never_fit_is_named():
  big = sequences.Document("rec-9", *(np.zeros(10, t) for t in (np.int32, np.int32, np.int32, np.float32)),
                           np.zeros((1, 2, 2, 1), np.float32), np.zeros(1, np.int32), np.zeros(1, bool))
  with pytest.raises(ValueError, match="rec-9"):
    list(packing.pack_documents([big], 8, 1, (2, 2, 1)))


def test_bad_records_error_or_skip(tok):
  encode, special = tk.CaptionEncoder(tok), tk.special_ids(tok)
  good = np.zeros((2, 2, 1), np.float32)
  cases = {
      "latent_shape": {"id": "bad-shape", "caption": "a cat", "latent": np.zeros((2, 3, 1), np.float32)},
      "latent_nonfinite": {"id": "bad-nan", "caption": "a cat", "latent": np.full((2, 2, 1), np.nan, np.float32)},
      "empty_caption": {"id": "bad-empty", "caption": "  ", "latent": good},
      "too_long": {"id": b"bad-long", "caption": " ".join(["river mountain"] * 20), "latent": good},
  }
  for reason, rec in cases.items():
    spec = sequences.SequenceSpec(text_len=16, image_slots=1, tokens_per_image=4, latent_shape=(2, 2, 1))
    rid = sequences.as_text(rec["id"])
    with pytest.raises(sequences.BadRecordError, match=rid):
      sequences.build_document(rec, encode, spec, special, seed=0, example_index=0)
    spec_skip = sequences.SequenceSpec(text_len=16, image_slots=1, tokens_per_image=4, latent_shape=(2, 2, 1),
                                       on_bad_record="skip")
    out = sequences.build_document(rec, encode, spec_skip, special, seed=0, example_index=0)
    assert isinstance(out, sequences.SkippedRecord) and out.reason == reason and out.record_id == rid


def test_order_and_dropout_rates_within_binomial_tolerance():
  """10k examples: P(caption first) = 0.8, P(dropout) = 0.1, within 4 sigma; draws independent."""
  spec = sequences.SequenceSpec(text_len=16, image_slots=1, tokens_per_image=1, latent_shape=(1, 1, 1))
  n = 10_000
  draws = np.array([sequences.draw_choices(spec, sequences.example_rng(3, i)) for i in range(n)])
  for col, p in ((0, 0.8), (1, 0.1)):
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(draws[:, col].mean() - p) < 4 * sigma, (col, draws[:, col].mean())
  # independence of the two draws: P(first and dropped) = 0.08
  both = (draws[:, 0] & draws[:, 1]).mean()
  assert abs(both - 0.08) < 4 * np.sqrt(0.08 * 0.92 / n)
  # reproducible per example
  again = np.array([sequences.draw_choices(spec, sequences.example_rng(3, i)) for i in range(100)])
  np.testing.assert_array_equal(again, draws[:100])
