"""--lr-schedule: warm-up then constant, cosine or linear, through MLX's schedule builders; resume keeps its place."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from grpo_mlx.train import trainer
from grpo_mlx.cli import cli
from grpo_mlx.core.config import build_config

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"


def rates_used(config, updates: int) -> list[float]:
    """The learning rate of each of the first `updates` optimizer updates."""
    optimizer = trainer.make_optimizer(config)
    layer = nn.Linear(2, 2)
    used = []
    for _ in range(updates):
        optimizer.update(layer, {"weight": mx.ones((2, 2)), "bias": mx.ones(2)})
        used.append(float(np.array(optimizer.learning_rate)))
    return used


def config_with(tmp_path, **values):
    base = dict(model=None, output=str(tmp_path / "run"), reward=[TEXT_REWARD], learning_rate=0.6)
    return build_config({}, {**base, **values})


def expected(schedule: str, steps: int, warmup: int, lr: float) -> list[float]:
    """The rate of training step k = 1..steps, written out: warm-up k/N, then the decay over the
    steps left after the first step at the full rate, reaching 0 one step after the last."""
    ramp = max(warmup - 1, 0)
    out = []
    for t in range(steps):
        if t < ramp:
            out.append(lr * (t + 1) / warmup)
            continue
        j, span = t - ramp, steps - ramp
        out.append({"constant": lr, "cosine": lr * 0.5 * (1 + math.cos(math.pi * j / span)), "linear": lr * (1 - j / span)}[schedule])
    return out


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_each_schedule_gives_the_written_out_rates(schedule, warmup, tmp_path):
    config = config_with(tmp_path, lr_schedule=schedule, warmup_steps=warmup, steps=10)
    np.testing.assert_allclose(rates_used(config, 10), expected(schedule, 10, warmup, 0.6), rtol=1e-5, atol=1e-7)


def test_decay_reaches_zero_after_the_last_step_and_the_mu_updates_of_a_step_share_its_rate(tmp_path):
    config = config_with(tmp_path, lr_schedule="cosine", warmup_steps=2, steps=6, num_iterations=2)
    used = rates_used(config, 12)
    np.testing.assert_allclose(used, np.repeat(expected("cosine", 6, 2, 0.6), 2), rtol=1e-5, atol=1e-7)
    assert used[0] == pytest.approx(0.3) and max(used) == pytest.approx(0.6)
    assert 0 < used[-1] < 0.1  # the last step still trains


def test_an_unknown_schedule_is_one_line(tmp_path):
    from grpo_mlx.core.errors import UserError

    with pytest.raises(UserError, match="lr_schedule='step'.*constant, cosine, linear"):
        config_with(tmp_path, lr_schedule="step")


def test_resume_continues_the_schedule_where_it_stopped(tiny_model_dir, tmp_path):
    def run_cli(out, steps, *extra):
        args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", str(steps),
                "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--learning-rate", "0.02",
                "--lr-schedule", "cosine", "--warmup-steps", "2", "--reward", TEXT_REWARD, "--save-every", "2",
                "--seed", "5", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output

    def rates(out):
        return {r["step"]: r["learning_rate"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    run_cli(tmp_path / "full", 5)
    run_cli(tmp_path / "split", 2)
    run_cli(tmp_path / "split", 5, "--resume")
    full, split = rates(tmp_path / "full"), rates(tmp_path / "split")
    np.testing.assert_allclose([full[k] for k in (1, 2, 3, 4, 5)], expected("cosine", 5, 2, 0.02), rtol=1e-5)
    np.testing.assert_allclose([split[k] for k in (3, 4, 5)], [full[k] for k in (3, 4, 5)], rtol=1e-6)
