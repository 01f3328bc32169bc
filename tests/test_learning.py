"""GRPO improves the warm-started demo model on its task: the embedded default visibly learns."""

import math

import pytest

from grpo_mlx.core.config import build_config
from grpo_mlx.data.examples import arithmetic_examples
from grpo_mlx.eval.demo import greedy_accuracy
from grpo_mlx.train.trainer import setup, train

HELD_OUT = 500  # problems; the demo model never saw these sums (seed 1234 is kept out of its training)


@pytest.mark.slow
def test_grpo_raises_held_out_greedy_accuracy_of_the_demo_model(tmp_path):
    """The demo's default settings (300 steps) on a fixed seed: ~2 minutes on 2 CPU cores."""
    held_out = arithmetic_examples(HELD_OUT, seed=1234)
    run = setup(build_config({}, {"output": str(tmp_path / "run"), "seed": 0}))
    assert run.config.steps >= 200  # the demo preset, not a shortened run
    before = greedy_accuracy(run.model, run.tokenizer, held_out)
    rewards = [metrics["reward"] for metrics, _ in train(run)]
    after = greedy_accuracy(run.model, run.tokenizer, held_out)

    # Standard error of the difference of two accuracies on n problems.
    se = math.sqrt((before * (1 - before) + after * (1 - after)) / len(held_out))
    assert after - before > 3 * se, (before, after, se)
    # The sampled reward the dashboard shows rises too: last 20 steps against the first 20,
    # by more than the noise of a 20-step mean of 64-completion batch means.
    first, last = rewards[:20], rewards[-20:]
    assert sum(last) / 20 - sum(first) / 20 > 0.1, (first, last)
