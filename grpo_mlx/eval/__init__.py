"""Evaluation: `grpo-mlx eval`, the held-out evaluation during training, pass@k and maj@k, the demo task."""
