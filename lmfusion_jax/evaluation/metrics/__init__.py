"""Evaluation metrics: CIDEr-D, caption accuracy, digit-classifier accuracy, Frechet distance."""
from lmfusion_jax.evaluation.metrics.cider import cider_d, tokenize
from lmfusion_jax.evaluation.metrics.digit_classifier import (DigitClassifier, classify, decision_features,
                                                   fit_digit_classifier, generation_accuracy, resize_area)
from lmfusion_jax.evaluation.metrics.fid import (FeatureFn, digit_feature_fn, fid_from_features, fid_from_images,
                                      frechet_distance, gaussian_stats)
from lmfusion_jax.evaluation.metrics.text import DIGIT_WORDS, caption_accuracy, mentioned_labels

__all__ = [
    "DIGIT_WORDS", "DigitClassifier", "FeatureFn", "caption_accuracy", "cider_d", "classify",
    "decision_features", "digit_feature_fn", "fid_from_features", "fid_from_images",
    "fit_digit_classifier", "frechet_distance", "gaussian_stats", "generation_accuracy",
    "mentioned_labels", "resize_area", "tokenize",
]
