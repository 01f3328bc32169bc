"""Rollout: G completions per prompt, single-turn (`batch`) or multi-turn (`multiturn`). The package is also the
old path `grpo_mlx.rollout`: it re-exports `batch`.
"""

from .batch import (
    MLX_LM_RANGE, MLX_LM_REQUIREMENT, check_mlx_lm, Rollout, pad_batch, make_sampler,
    generate_rollout,
)
