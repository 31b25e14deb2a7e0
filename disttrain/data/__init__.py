"""Datasets and the resumable distributed sampler."""
from disttrain.data.sampler import ResumableBatchSampler
from disttrain.data.synthetic import synthetic_regression, synthetic_classification
from disttrain.data.text import char_corpus

__all__ = ["ResumableBatchSampler", "synthetic_regression", "synthetic_classification", "char_corpus"]
