"""Evaluation: the benchmark, metrics, the evaluation classifier, the SD-scale protocol."""
