"""Step metrics, named as TRL names them: rewards, completions, the update's
token-weighted metrics, and the sample the dashboard shows.

With several ranks every number is the global batch's (ranks send rows or sums, not means).
"""

from __future__ import annotations

import numpy as np

from ..core.config import TrainConfig
from ..rollout.batch import Rollout
from . import distributed

# What the loss function reports per micro-batch; ranks reduce these by name, in this order.
UPDATE_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio/mean", "entropy")


def reduce_update_metrics(loss: float, micro_batch_stats) -> tuple[float, dict]:
    """The global loss (a sum over micro-batches and ranks) and the token-weighted metrics.

    `micro_batch_stats` holds (completion tokens, metrics) per micro-batch of this rank.
    """
    tokens = sum(w for w, _ in micro_batch_stats)
    local = [loss, tokens] + [sum(w * m[k] for w, m in micro_batch_stats) for k in UPDATE_METRICS]
    total = distributed.sum_across(local)
    weight = max(total[1], 1.0)
    return float(total[0]), {k: float(v / weight) for k, v in zip(UPDATE_METRICS, total[2:])}


# ---------------------------------------------------------------- rewards and completions


def reward_metrics(rewards, applicable, columns, group_size) -> dict:
    r = np.array(rewards, dtype=np.float64)
    if r.size == 0:
        return {"reward": float("nan"), "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    groups = r.reshape(-1, group_size)
    metrics = {
        "reward": float(r.mean()),
        "reward_std": float(groups.std(axis=1, ddof=1).mean()),
        "frac_reward_zero_std": float((np.ptp(groups, axis=1) == 0).mean()),
    }
    for name, column in columns.items():
        values = [v for v in column if v is not None]
        if values:
            metrics[f"rewards/{name}/mean"] = float(np.mean(values))
            metrics[f"rewards/{name}/std"] = float(np.std(values))
    return metrics


def completion_metrics(lengths, truncated) -> dict:
    lengths = np.asarray(lengths, dtype=np.float64) if len(lengths) else np.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/min_length": float(lengths.min()),
        "completions/clipped_ratio": float(np.mean(truncated)) if len(truncated) else 0.0,
    }


# A multi-turn rollout's per-row counts that the turn and tool metrics are made of.
TURN_COLUMNS = ("turns", "tool_calls", "tool_errors")


def turn_metrics(turns, tool_calls, tool_errors) -> dict:
    """`turns/mean` (model turns per trajectory), `tools/calls_per_trajectory`, and `tools/errors`:
    the share of the batch's tool calls that answered an error (0 without calls)."""
    calls = float(np.sum(tool_calls))
    return {
        "turns/mean": float(np.mean(turns)) if len(turns) else 0.0,
        "tools/calls_per_trajectory": float(np.mean(tool_calls)) if len(tool_calls) else 0.0,
        "tools/errors": float(np.sum(tool_errors)) / calls if calls else 0.0,
    }


def batch_metrics(rollout: Rollout, rewards, applicable, columns, config: TrainConfig) -> dict:
    """Reward and completion metrics of the global batch: every rank's rows, in rank order.

    Ranks send their rows, not their means, so the numbers equal one process's.
    """
    G = config.group_size
    names = sorted(columns)  # every rank runs the same reward functions
    turn_columns = TURN_COLUMNS if rollout.multi_turn else ()  # the same on every rank: set by the config
    first = 4 + len(turn_columns)
    table = np.zeros((rollout.num_rows, first + len(names)))
    table[:, 0], table[:, 1] = rewards, applicable
    table[:, 2], table[:, 3] = rollout.completion_lengths, rollout.truncated
    for i, field in enumerate(turn_columns):
        table[:, 4 + i] = getattr(rollout, field)
    for i, name in enumerate(names):  # a reward that does not apply (None) travels as NaN
        table[:, first + i] = [np.nan if v is None else float(v) for v in columns[name]]
    capacity = distributed.local_batch_size(config.batch_size, distributed.world().size()) * G
    rows = distributed.gather_rows(table, capacity)
    columns = {name: [None if np.isnan(v) else float(v) for v in rows[:, first + i]] for i, name in enumerate(names)}
    metrics = reward_metrics(list(rows[:, 0]), list(rows[:, 1] > 0), columns, G)
    metrics.update(completion_metrics(rows[:, 2], rows[:, 3] > 0))
    if turn_columns:
        metrics.update(turn_metrics(*(rows[:, 4 + i] for i in range(len(turn_columns)))))
    if config.dynamic_sampling:
        metrics["num_groups"] = len(rows) // G
    return metrics


def prompt_text(example) -> str:
    if isinstance(example.prompt, str):
        return example.prompt
    return next((m["content"] for m in reversed(example.prompt) if m.get("role") == "user"), str(example.prompt))


def make_sample(step, rollout: Rollout, examples, rewards) -> dict:
    """The first group: its prompt, answer, completions and rewards; for a multi-turn rollout also each
    trajectory's messages after the prompt ("trajectories": [[{"role", "content"}, ...], ...]), turn by turn."""
    G = rollout.group_size
    sample = {
        "step": step,
        "prompt": prompt_text(examples[0]),
        "answer": examples[0].answer,
        "completions": rollout.texts[:G],
        "rewards": [float(r) for r in rewards[:G]],
    }
    if rollout.messages is not None:
        sample["trajectories"] = [[dict(m) for m in messages] for messages in rollout.messages[:G]]
    return sample
