"""Presenting a run: formatting, the live dashboard, experiment trackers, metrics.jsonl and `grpo-mlx report`."""
