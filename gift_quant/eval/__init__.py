"""Evaluation: perplexity over held-out windows and zero-shot accuracy with lm-evaluation-harness."""
