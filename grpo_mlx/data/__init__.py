"""Data: examples (local files, hub data sets, built-in tasks) and their prompts. The package is also the old
path `grpo_mlx.data`: it re-exports `examples`.
"""

from .examples import (
    Example, arithmetic_examples, countdown_examples, multiplication_examples, BUILTIN_TASKS,
    BUILTIN_SIZES, HELD_OUT_SEED_OFFSET, PROMPT_FIELDS, ANSWER_FIELDS, DATA_SUFFIXES,
    load_examples, load_examples_with_stats, SPLIT_KEYWORDS, split_keywords, epoch_order,
    take_examples,
)
