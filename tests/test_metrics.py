"""Tests for lmfusion_jax.evaluation.metrics: CIDEr-D (hand-computed cases), caption accuracy, digit classifier, FID."""
import math

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lmfusion_jax.evaluation.metrics import (DIGIT_WORDS, caption_accuracy, cider_d, classify, digit_feature_fn,
                                  fid_from_features, fid_from_images, fit_digit_classifier,
                                  frechet_distance, generation_accuracy, mentioned_labels, resize_area,
                                  tokenize)

PENALTY_1 = math.exp(-1.0 / (2 * 6.0 ** 2))   # gaussian length penalty for |l(c) - l(s)| = 1, sigma 6


# ----------------------------------------------------------------------------------------------- CIDEr-D

def test_tokenize_lowercases_and_strips_punctuation():
  assert tokenize("A Dog's toy, on-the MAT!  (big_one)") == ["a", "dogs", "toy", "on", "the", "mat",
                                                             "big", "one"]
  assert tokenize("  ") == []


def test_cider_d_two_images_hand_computed():
  # Corpus: |I| = 2, L = log 2.  Reference sets:  A = {"a cat sits"},  B = {"a dog runs", "the dog runs"}.
  # df("a") = 2 -> idf 0; every other reference n-gram has df 1 -> idf = L.
  # A: cand "a cat" vs "a cat sits":
  #   n=1: g_c = {cat: L} |g_c| = L; g_r = {a: 0, cat: L, sits: L} |g_r| = L*sqrt2; dot = L^2 -> 1/sqrt2
  #   n=2: g_c = {a cat: L}; g_r = {a cat: L, cat sits: L} -> 1/sqrt2;  n=3,4: candidate has none -> 0
  #   lengths 2 vs 3 -> penalty exp(-1/72).  score = 10 * (2/sqrt2)/4 * exp(-1/72)
  # B: cand "a dog": vs "a dog runs" same as A -> (1/sqrt2, 1/sqrt2, 0, 0)
  #   vs "the dog runs": n=1 g_r = {the, dog, runs: L} |g_r| = L*sqrt3, dot = L^2 -> 1/sqrt3; n=2 no overlap
  #   score = 10/2 * [(2/sqrt2)/4 + (1/sqrt3)/4] * exp(-1/72)
  s2, s3 = math.sqrt(2.0), math.sqrt(3.0)
  want_a = 10.0 * (2 / s2) / 4 * PENALTY_1
  want_b = 10.0 / 2 * ((2 / s2) / 4 + (1 / s3) / 4) * PENALTY_1
  corpus, per_id = cider_d({"A": "a cat", "B": "A dog."},
                           {"A": ["a cat sits"], "B": ["a dog runs", "The dog runs"]})
  assert per_id["A"] == pytest.approx(want_a, rel=1e-12)   # 3.4868...
  assert per_id["B"] == pytest.approx(want_b, rel=1e-12)   # 2.4551...
  assert corpus == pytest.approx((want_a + want_b) / 2, rel=1e-12)


def test_cider_d_clipping_and_unseen_ngram_hand_computed():
  # Same corpus; A's candidate is "a cat cat" (3 tokens, like the reference: penalty 1).
  #   n=1: g_c = {a: 0, cat: 2L} |g_c| = 2L; g_r = {cat: L, sits: L}: clipped dot = min(2L, L) * L = L^2
  #        -> L^2 / (2L * L sqrt2) = 1/(2 sqrt2)   (unclipped would be 1/sqrt2)
  #   n=2: g_c = {a cat: L, cat cat: L}; "cat cat" is in no reference: df 0 -> idf log2 - log(max(1,0)) = L
  #        |g_c| = L sqrt2, |g_r| = L sqrt2, dot = L^2 -> 1/2
  #   n=3: "a cat cat" vs "a cat sits": 0.     score = 10 * (1/(2 sqrt2) + 1/2) / 4
  want_a = 10.0 * (1 / (2 * math.sqrt(2.0)) + 0.5) / 4
  _, per_id = cider_d({"A": "A cat, cat.", "B": "a dog"},
                      {"A": ["a cat sits"], "B": ["a dog runs", "the dog runs"]})
  assert per_id["A"] == pytest.approx(want_a, rel=1e-12)   # 2.1339...


def test_cider_d_three_images_unequal_idf_hand_computed():
  # |I| = 3. References: A "red cat", B "red dog", C "blue bird".
  # df(red) = 2 -> idf a = log3 - log2; every other n-gram df 1 -> idf b = log3.
  # A: cand "red dog" vs "red cat": n=1 g_c = {red: a, dog: b}, g_r = {red: a, cat: b}, dot = a^2
  #    -> a^2 / (a^2 + b^2); bigram "red dog" vs "red cat": 0; equal lengths.
  # B: cand == ref "red dog": n=1 and n=2 cosine 1, n=3,4: no n-grams -> 0.  score = 10 * 2/4 = 5.
  # C: cand "bird" vs "blue bird": n=1 b^2 / (b * b sqrt2) = 1/sqrt2, lengths 1 vs 2.
  a, b = math.log(3.0) - math.log(2.0), math.log(3.0)
  want = {"A": 10.0 * (a * a / (a * a + b * b)) / 4, "B": 5.0,
          "C": 10.0 * (1 / math.sqrt(2.0)) / 4 * PENALTY_1}
  corpus, per_id = cider_d({"A": "red dog", "B": "red dog", "C": "bird"},
                           {"A": ["red cat"], "B": ["red dog"], "C": ["blue bird"]})
  for k, v in want.items():
    assert per_id[k] == pytest.approx(v, rel=1e-12), k
  assert corpus == pytest.approx(sum(want.values()) / 3, rel=1e-12)


def test_cider_d_candidate_equal_to_its_only_distinct_reference_scores_ten():
  # References share no n-gram across images -> all idf = log|I|; candidate == reference (>= 4 tokens)
  # gives cosine 1 for n = 1..4 and penalty 1: 10 * mean(1, 1, 1, 1) = 10.
  refs = {0: ["one red cat sits here"], 1: ["two blue dogs run fast"], 2: ["green bird flies high up"]}
  corpus, per_id = cider_d({k: v[0] for k, v in refs.items()}, refs)
  assert corpus == pytest.approx(10.0, rel=1e-12)
  assert all(v == pytest.approx(10.0, rel=1e-12) for v in per_id.values())


def test_cider_d_is_zero_without_ngram_overlap():
  corpus, per_id = cider_d({"x": "purple elephant", "y": "green frog jumps"},
                           {"x": ["a cat on a mat"], "y": ["the dog runs", "a dog runs away"]})
  assert corpus == 0.0 and per_id == {"x": 0.0, "y": 0.0}


def test_cider_d_does_not_depend_on_id_order():
  rng = np.random.default_rng(0)
  vocab = "a the cat dog sits runs on mat red blue big small".split()
  sentence = lambda: " ".join(rng.choice(vocab, int(rng.integers(2, 9))))
  ids = [f"img{i}" for i in range(7)]
  cands = {i: sentence() for i in ids}
  refs = {i: [sentence() for _ in range(int(rng.integers(1, 4)))] for i in ids}
  corpus, per_id = cider_d(cands, refs)
  order = [ids[k] for k in rng.permutation(len(ids))]
  corpus_p, per_id_p = cider_d({i: cands[i] for i in order}, {i: refs[i] for i in reversed(order)})
  assert corpus > 0
  assert corpus_p == pytest.approx(corpus, rel=1e-12)
  assert all(per_id_p[i] == pytest.approx(per_id[i], rel=1e-12) for i in ids)


def test_cider_d_errors_name_the_id():
  with pytest.raises(ValueError, match="'img7' has no references"):
    cider_d({"img1": "a cat", "img7": "a dog"}, {"img1": ["a cat"]})
  with pytest.raises(ValueError, match=r"references\['img1'\] must be a non-empty list"):
    cider_d({"img1": "a cat"}, {"img1": []})
  with pytest.raises(ValueError, match="'img2' has no candidate"):
    cider_d({"img1": "a cat"}, {"img1": ["a cat"], "img2": ["a dog"]})


# ------------------------------------------------------------------------------------ caption accuracy

def test_caption_accuracy_hand_written_cases():
  cases = [  # (caption, label, correct?)
      ("This is a seven.", 7, True),
      ("a 7", 7, True),
      ("Seven, yes: 7!", 7, True),          # the same digit twice is fine
      ("a seven and a one", 7, False),      # two different digits
      ("a handwritten digit", 3, False),    # no digit named
      ("three", 8, False),                  # wrong digit
      ("number 17", 7, False),              # "17" is not the numeral 7
      ("someone drew a two", 2, True),      # "someone" does not mention "one"
      ("ZERO", 0, True),
      ("sevens", 7, False),
  ]
  captions, labels, correct = zip(*cases)
  assert caption_accuracy(list(captions), list(labels)) == pytest.approx(sum(correct) / len(cases))
  for caption, label, ok in cases:
    assert caption_accuracy([caption], [label]) == float(ok), caption
  assert mentioned_labels("a seven and a 1") == {7, 1}
  assert DIGIT_WORDS[9] == "nine"


def test_caption_accuracy_custom_words_and_errors():
  words = ["cat", ("dog", "puppy")]
  assert caption_accuracy(["a puppy", "a cat", "cat and dog", "1"], [1, 0, 0, 1], words) == 0.75
  with pytest.raises(ValueError, match="2 captions but 1 labels"):
    caption_accuracy(["a", "b"], [1])
  with pytest.raises(ValueError, match=r"labels\[1\] = 12 outside 0..9"):
    caption_accuracy(["one", "two"], [1, 12])
  with pytest.raises(ValueError, match="names both class 0 and class 1"):
    caption_accuracy(["x"], [0], ["cat", "cat"])


# ------------------------------------------------------------------------------------ digit classifier

@pytest.fixture(scope="module")
def digits_split():
  """sklearn digits, pixels 0..16 -> [-1, 1], 70/30 stratified split."""
  data = load_digits()
  images = data.images.astype(np.float32) / 8.0 - 1.0                   # [1797, 8, 8]
  return train_test_split(images, data.target, test_size=0.3, random_state=0, stratify=data.target)


@pytest.fixture(scope="module")
def digit_clf(digits_split):
  x_train, _, y_train, _ = digits_split
  return fit_digit_classifier(x_train, y_train)


def test_resize_area_matches_block_means_and_undoes_nearest_upsampling():
  rng = np.random.default_rng(0)
  small = rng.uniform(-1, 1, (3, 8, 8))
  for factor in (2, 4):
    up = np.repeat(np.repeat(small, factor, axis=1), factor, axis=2)
    np.testing.assert_allclose(resize_area(up), small, atol=1e-12)
  big = rng.uniform(-1, 1, (2, 16, 24))
  np.testing.assert_allclose(resize_area(big), big.reshape(2, 8, 2, 8, 3).mean(axis=(2, 4)), atol=1e-12)
  # 12 -> 8 (fractional cells): same as nearest x2 to 24, then 3x3 block means.
  odd = rng.uniform(-1, 1, (2, 12, 12))
  twice = np.repeat(np.repeat(odd, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(resize_area(odd), twice.reshape(2, 8, 3, 8, 3).mean(axis=(2, 4)), atol=1e-12)


def test_digit_classifier_held_out_accuracy(digits_split, digit_clf):
  _, x_test, _, y_test = digits_split
  acc_8 = generation_accuracy(digit_clf, x_test, y_test)
  nearest_16 = np.repeat(np.repeat(x_test, 2, axis=1), 2, axis=2)[..., None]   # [N, 16, 16, 1]
  acc_16 = generation_accuracy(digit_clf, nearest_16, y_test)
  bilinear_32 = np.asarray(jax.image.resize(x_test, (len(x_test), 32, 32), "bilinear"))
  acc_32 = generation_accuracy(digit_clf, bilinear_32, y_test)
  print(f"digit classifier held-out accuracy: 8x8 {acc_8:.4f}, nearest 16x16 {acc_16:.4f}, "
        f"bilinear 32x32 {acc_32:.4f} ({len(y_test)} images)")
  assert acc_8 >= 0.90
  assert acc_16 == acc_8
  assert acc_32 >= 0.90
  np.testing.assert_array_equal(classify(digit_clf, nearest_16), classify(digit_clf, x_test))


def test_digit_classifier_permuted_prompts_are_near_chance(digits_split, digit_clf):
  _, x_test, _, y_test = digits_split
  permuted = np.random.default_rng(0).permutation(y_test)
  acc = generation_accuracy(digit_clf, x_test, permuted)
  print(f"accuracy against permuted prompted labels: {acc:.4f} (chance ~0.10)")
  assert 0.03 <= acc <= 0.2


def test_digit_classifier_is_deterministic_and_validates(digits_split, digit_clf):
  x_train, x_test, y_train, _ = digits_split
  again = fit_digit_classifier(x_train, y_train)
  np.testing.assert_array_equal(again.pipeline[-1].coef_, digit_clf.pipeline[-1].coef_)
  assert digit_clf.classes == tuple(range(10))
  with pytest.raises(ValueError, match=r"classify images: expected .* got shape \(5, 8, 8, 3\)"):
    classify(digit_clf, np.zeros((5, 8, 8, 3)))
  bad = x_test[:4].copy()
  bad[2, 1, 1] = np.nan
  with pytest.raises(ValueError, match="image 2 has non-finite pixels"):
    classify(digit_clf, bad)
  with pytest.raises(ValueError, match="expected 4 labels"):
    generation_accuracy(digit_clf, x_test[:4], [1, 2, 3])


# ------------------------------------------------------------------------------------------------ FID

def _fd_symmetric_form(mu1, s1, mu2, s2):
  """Independent formula: |dmu|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) via symmetric eigh."""
  def psd_sqrt(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  r1 = psd_sqrt(s1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


def test_frechet_distance_closed_forms():
  # 1-D: (1 - 3)^2 + 4 + 9 - 2 sqrt(36) = 5
  assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(5.0, rel=1e-12)
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2))
  assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_symmetric_form(mu1, s1, mu2, s2),
                                                             rel=1e-8)


def test_fid_from_features_hand_computed_zero_and_symmetric():
  # a = {0, 2}: mean 1, unbiased var 2;  b = {3, 5, 7}: mean 5, var 4.  FD = 16 + 2 + 4 - 2 sqrt(8)
  assert fid_from_features([[0.0], [2.0]], [[3.0], [5.0], [7.0]]) == pytest.approx(22 - 2 * math.sqrt(8))
  rng = np.random.default_rng(1)
  fa, fb = rng.normal(size=(200, 5)), rng.normal(0.5, 2.0, size=(150, 5))
  assert abs(fid_from_features(fa, fa)) < 1e-8
  assert fid_from_features(fa, fb) == pytest.approx(fid_from_features(fb, fa), rel=1e-8)
  # rank-deficient covariances (fewer samples than features): imaginary noise handled, finite result
  fc, fd = rng.normal(size=(4, 10)), rng.normal(size=(5, 10))
  got = fid_from_features(fc, fd)
  want = _fd_symmetric_form(fc.mean(0), np.cov(fc.T), fd.mean(0), np.cov(fd.T))
  assert np.isfinite(got) and got == pytest.approx(want, rel=1e-4)


def test_frechet_distance_rejects_non_psd_and_mismatched_inputs():
  with pytest.raises(ValueError, match="imaginary"):
    frechet_distance([0.0, 0.0], np.diag([1.0, -1.0]), [0.0, 0.0], np.eye(2))
  with pytest.raises(ValueError, match="feature sizes differ"):
    frechet_distance([0.0], [[1.0]], [0.0, 0.0], np.eye(2))
  with pytest.raises(ValueError, match=r"expected features \[N >= 2, D\]"):
    fid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))


def test_digit_feature_fid_ranks_real_above_noise_and_wrong_class(digits_split, digit_clf):
  x_train, x_test, _, y_test = digits_split
  features = digit_feature_fn(digit_clf)
  real = fid_from_images(x_train, x_test, features)
  noise = fid_from_images(x_train, np.random.default_rng(0).uniform(-1, 1, x_test.shape), features)
  ones_only = fid_from_images(x_train, x_test[y_test == 1], features)
  print(f"digit-logit FD: train vs held-out {real:.3f}, vs uniform noise {noise:.1f}, "
        f"vs held-out ones only {ones_only:.1f}")
  assert features(x_test).shape == (len(x_test), 10)
  assert real < 0.1 * ones_only and real < 0.1 * noise
