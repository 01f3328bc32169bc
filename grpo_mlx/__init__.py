"""grpo-mlx: Group Relative Policy Optimization for language models on MLX."""

__version__ = "0.1.0"
