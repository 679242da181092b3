"""Evaluation: GenEval-like scoring, reward scoring, best-of-N, summaries and plots."""
