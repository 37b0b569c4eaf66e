"""Evaluation: the ranking metrics, per-user results, paired comparisons and tables of runs."""
