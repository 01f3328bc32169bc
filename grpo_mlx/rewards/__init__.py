"""Rewards: the registry, plug-ins and the calling rule (`registry`), the built-ins (`builtins`), checked and
timed calls and combined scoring (`scoring`, `worker`), answer checking (`answers`). The package is also the
old path `grpo_mlx.rewards`: it re-exports what that module held.
"""

from ..core.plugins import accepted_kwargs, exception_text
from .builtins import (
    COSINE_CORRECT, COSINE_WRONG, COSINE_MAX_LENGTH, REPETITION_NGRAM, REPETITION_MAX_PENALTY,
    OVERLONG_MAX_LENGTH, accuracy_reward, format_reward, format_strict_reward, tag_count_reward,
    reasoning_steps_reward, length_reward, cosine_reward, repetition_reward, overlong_reward,
)
from .registry import (
    RewardFn, RewardError, register_reward, list_rewards, TrainerState, calls_by_keyword,
    reward_arguments, completion_texts,
)
from .scoring import (
    get_reward, RewardTimeoutError, checked_reward, score_column, first_failing_rows,
    combine_rewards, score_completions,
)
from .worker import (
    BUILTINS_MODULE, RewardTimeout, run_reward_call, ORPHAN_CHECK_SECONDS, RewardWorker,
    serve_reward_calls, stop_reward_worker,
)
