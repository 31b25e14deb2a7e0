"""Hyperparameter sweeps: one trial as a job (``job``, ``trial``), early pruning (``prune``),
the summary table and plots of a sweep directory (``report``)."""
