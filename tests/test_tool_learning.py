"""GRPO teaches the warm-started tool demo to use its calculator: with no --model, `--tools calculator`
trains grpo_mlx/demo_tools_model with DEMO_TOOLS_PRESET, and `eval --adapter-path RUN --tools
calculator` measures it on the multiplication test split. Both the tool-call rate and held-out
greedy accuracy with tools rise, by far more than their noise."""

import json
import math

import pytest

from grpo_mlx.core.config import DEMO_TOOLS_PRESET, EvalConfig, build_config
from grpo_mlx.eval.evaluate import evaluate
from grpo_mlx.train.runner import run_training

HELD_OUT = 200  # problems of the multiplication test split (eval's seed 0: the warm start never saw them)
STEPS = 10  # the preset's first 10 steps (of 50) already show it: ~25 s on 2 busy CPU cores


def held_out(adapter_path=None, **flags) -> dict:
    """`grpo-mlx eval --tools calculator [--adapter-path RUN]` on the held-out problems, greedy."""
    config = build_config({}, {"tools": "calculator", "adapter_path": adapter_path, "limit": HELD_OUT,
                               "batch_size": 32, **flags}, EvalConfig)
    return evaluate(config)


@pytest.mark.slow
def test_grpo_raises_tool_use_and_held_out_accuracy_of_the_tool_demo(tmp_path):
    """Fixed seed; B=4 (half the preset's) keeps it under ~40 s."""
    before = held_out()
    assert before["settings"]["model"] == "embedded-demo-tools" and before["settings"]["dataset"] == "multiplication"
    assert before["settings"]["max_turns"] == DEMO_TOOLS_PRESET["max_turns"]

    config = build_config({}, {"tools": "calculator", "dataset": "multiplication", "output": str(tmp_path / "run"),
                               "seed": 0, "steps": STEPS, "batch_size": 4})
    assert config.learning_rate == DEMO_TOOLS_PRESET["learning_rate"]  # the tool preset, not the addition demo's
    assert config.max_trajectory_tokens == DEMO_TOOLS_PRESET["max_trajectory_tokens"]
    run_dir = run_training(config)
    # The base eval, fuse and generate load for these adapters: the tool demo, not the addition demo.
    assert json.loads((run_dir / "adapter_config.json").read_text())["model"] == "embedded-demo-tools"
    after = held_out(adapter_path=str(run_dir))
    assert after["settings"]["model"] == "embedded-demo-tools"

    # Standard error of the difference of two accuracies on HELD_OUT problems.
    p, q = before["accuracy"], after["accuracy"]
    se = math.sqrt((p * (1 - p) + q * (1 - q)) / HELD_OUT)
    assert q - p > 5 * se, (p, q, se)
    # Greedy tool use on the held-out problems, and the sampled rate during training, both rise.
    assert after["tools/calls_per_trajectory"] > before["tools/calls_per_trajectory"] + 0.3, (before, after)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tools/calls_per_trajectory"] for m in steps if "tools/calls_per_trajectory" in m]
    assert len(rates) == STEPS
    assert sum(rates[-3:]) / 3 > sum(rates[:3]) / 3 + 0.2, rates

    # Accuracy reads the last model turn only: cut off right after its call (one turn), the trained
    # model, which now always calls the tool, scores nothing: its call `347 * 2816` is no answer.
    cut = held_out(adapter_path=str(run_dir), max_turns=1, limit=32)
    assert cut["tools/calls_per_trajectory"] > 0.9
    assert cut["accuracy"] == 0.0, [e["messages"] for e in cut["examples"] if e["correct"]]
