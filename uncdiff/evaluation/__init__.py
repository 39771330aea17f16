"""Evaluation: FID, sparsification metrics, the experiments of `evaluate` and their reports."""
