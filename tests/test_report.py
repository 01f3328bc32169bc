"""`grpo-mlx report`: runs side by side, and a plot that shows their curves."""

import builtins
import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from grpo_mlx.cli import cli, main
from grpo_mlx.core.errors import UserError
from grpo_mlx.ui.report import plot_runs, summarize_run


def write_run(run_dir, rewards, kl_per_step, seconds_per_step=2.0, tokens_per_step=64, config=None):
    """A run directory as the trainer leaves it: metrics.jsonl (+ config.yaml)."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, reward in enumerate(rewards, start=1):
            record = {
                "step": step,
                "reward": reward,
                "rewards/accuracy/mean": reward / 2,
                "kl": kl_per_step * step,
                "completions/mean_length": 10.0 + 3 * math.sin(step),
                "time/generation": 0.5,
                "tokens_per_sec/generation": tokens_per_step / 0.5,
                "step_time": seconds_per_step,
            }
            f.write(json.dumps(record) + "\n")
    if config is not None:
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "baseline", [0.1, 0.35, 0.8125, 0.6], 0.001, config={"model": "m", "loss_type": "grpo"})
    b = write_run(tmp_path / "dapo", [0.2, 0.4, 0.55, 0.9375, 0.9, 0.85], 0.002, seconds_per_step=30,
                  config={"model": "m", "loss_type": "dapo"})
    return a, b


def test_summary_numbers_of_one_run(two_runs):
    s = summarize_run(two_runs[0])
    assert s["steps"] == 4
    assert s["best_reward"] == 0.8125 and s["best_step"] == 3
    assert s["final_reward"] == 0.6
    assert s["final_kl"] == pytest.approx(0.004)
    assert s["time"] == pytest.approx(8.0)
    assert s["tokens"] == 4 * 64
    assert s["rewards"] == {"accuracy": 0.3}
    assert s["loss_type"] == "grpo" and s["dataset"] is None


def test_report_shows_both_runs_side_by_side(two_runs):
    result = CliRunner().invoke(cli, ["report", *map(str, two_runs)], terminal_width=120)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "baseline" in line)
    assert header.index("baseline") < header.index("dapo")

    def row(label):
        line = next(line for line in lines if line.strip().startswith(label))
        return line.split()

    assert row("best reward")[2:] == ["0.812", "(step", "3)", "0.938", "(step", "4)"]
    assert row("final reward")[2:] == ["0.6", "0.85"]
    assert row("final accuracy")[2:] == ["0.3", "0.425"]
    assert row("final KL")[2:] == ["0.004", "0.012"]
    assert row("steps")[1:] == ["4", "6"]
    assert row("time")[1:] == ["0:08", "3:00"]
    assert row("tokens generated")[2:] == ["256", "384"]
    assert row("loss type")[2:] == ["grpo", "dapo"]


def test_report_reads_a_run_killed_mid_line(tmp_path):
    run = write_run(tmp_path / "killed", [0.25, 0.5], 0.001)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 0.9')
    s = summarize_run(run)
    assert s["steps"] == 2 and s["final_reward"] == 0.5 and s["best_reward"] == 0.5


def test_report_of_a_folder_without_metrics_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no metrics file at") and len(err.strip().splitlines()) == 1


def test_plot_without_matplotlib_is_a_one_line_user_error(two_runs, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r"pip install 'grpo-mlx\[plot\]'"):
        plot_runs(two_runs, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_plot_draws_a_line_per_run(two_runs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional extra grpo-mlx[plot]")
    from matplotlib.image import imread
    import numpy as np

    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["report", *map(str, two_runs), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert f"plot written to {out}" in result.output

    image = imread(out)  # float RGBA in [0, 1]
    assert image.shape == (800, 700, 4)
    rgb = image[..., :3]
    non_white = np.any(rgb < 0.95, axis=-1)
    assert 0.01 < non_white.mean() < 0.5, non_white.mean()  # lines, axes and text, not a blank or filled canvas
    # The two runs' lines are matplotlib's first two colours (blue C0, orange C1), both plentiful.
    blue = (np.abs(rgb - [0.122, 0.467, 0.706]) < 0.06).all(axis=-1)
    orange = (np.abs(rgb - [1.0, 0.498, 0.055]) < 0.06).all(axis=-1)
    assert blue.sum() > 500 and orange.sum() > 500, (blue.sum(), orange.sum())


def test_plot_into_a_missing_folder_is_a_user_error(two_runs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional extra grpo-mlx[plot]")
    with pytest.raises(UserError, match="does not exist"):
        plot_runs(two_runs, tmp_path / "no" / "out.png")


def test_report_reads_runs_without_loading_the_dashboard_or_mlx():
    # report reads metrics.jsonl through run_log; the live screen and MLX stay unloaded.
    code = "import sys, grpo_mlx.ui.report; print(sorted(m for m in ('grpo_mlx.ui.dashboard', 'mlx.core') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
