"""The dashboard shows what the trainer emits; metrics.jsonl survives a killed run."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from grpo_mlx.ui.dashboard import Dashboard, parse_plain_line, plain_line, sparkline
from grpo_mlx.ui.display import format_value, wants_plain_lines
from grpo_mlx.ui.run_log import MetricsLogger, keep_metrics_until, read_metrics

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
ANSI_OR_CONTROL = re.compile(r"\x1b|[\x00-\x08\x0b-\x1f\x7f]")


def scripted_metrics(steps: int) -> list[dict]:
    """Every metric the trainer emits, with values that move from step to step."""
    return [
        {
            "step": s,
            "reward": 0.125 * s,
            "reward_std": 0.5 / s,
            "frac_reward_zero_std": 0.25,
            "rewards/accuracy/mean": 0.1 * s,
            "rewards/accuracy/std": 0.3,
            f"rewards/{TEXT_REWARD}/mean": 1.5 + s,
            "kl": 0.0004 * s,
            "loss": -0.0123 * s,
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.0625,
            "clip_ratio/region_mean": 0.0625,
            "ratio/mean": 1.0,
            "entropy": 4.5,
            "grad_norm": 0.25,
            "skipped_update": 0.0,
            "completions/mean_length": 20.0 + s,
            "completions/max_length": 64.0,
            "completions/min_length": 3.0,
            "completions/clipped_ratio": 0.375,
            "tokens_per_sec/generation": 412.3,
            "tokens_per_sec/train": 1834.0,
            "peak_memory_gb": 1.234,
            "learning_rate": 1e-5,
            "time/generation": 1.25,
            "time/rewards": 0.001,
            "time/logprobs": 0.25,
            "time/train": 0.5,
            "step_time": 2.0,
        }
        for s in range(1, steps + 1)
    ]


SAMPLE = {
    "step": 5,
    "prompt": "What is 12 plus 30?",
    "answer": "42",
    # "[bold]" must show as text, never be read as rich markup.
    "completions": ["I guess 41 [bold]maybe[/bold]", "<answer>42</answer>", "no idea"],
    "rewards": [0.25, 2.0, 0.0],
}


def recording_console(width=120):
    return Console(record=True, width=width, file=io.StringIO(), color_system=None)


def screen_text(dashboard: Dashboard) -> str:
    """The live screen as the dashboard's own (recording) console would draw it."""
    dashboard.console.print(dashboard.render())
    return dashboard.console.export_text()


def table_value(screen: str, label: str) -> str:
    """The value printed right after `label` on the screen."""
    number = r"-?\d[\d.]*(?:e[-+]\d+)?(?:%|s| GB)?"
    match = re.search(r"(?<!\S)" + re.escape(label) + r"\s+(" + number + r")(?!\S)", screen)
    assert match, f"{label!r} not on screen:\n{screen}"
    return match.group(1)


# ---------------------------------------------------------------- the live screen


def test_screen_shows_progress_and_latest_metrics_formatted():
    dashboard = Dashboard(total_steps=40, console=recording_console(), plain=False)
    for m in scripted_metrics(4):
        dashboard.update(m)
    screen = screen_text(dashboard)

    assert "step 4/40" in screen
    assert "2.00s/step" in screen
    assert "ETA 1:12" in screen  # 36 steps left at 2 s each
    assert table_value(screen, "reward") == "0.5"
    assert table_value(screen, "reward std") == "0.125"
    assert table_value(screen, "zero-std groups") == "25%"
    assert table_value(screen, "KL") == "0.0016"
    assert table_value(screen, "loss") == "-0.0492"
    assert table_value(screen, "clip high") == "6.25%"
    assert table_value(screen, "mean length") == "24"
    assert table_value(screen, "max length") == "64"
    assert table_value(screen, "truncated") == "37.5%"
    assert table_value(screen, "gen tok/s") == "412"
    assert table_value(screen, "train tok/s") == "1834"
    assert table_value(screen, "peak memory") == "1.23 GB"
    assert table_value(screen, "learning rate") == "1e-05"


def test_screen_lists_each_reward_function_mean_by_short_name():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    for m in scripted_metrics(3):
        dashboard.update(m)
    screen = screen_text(dashboard)
    assert table_value(screen, "accuracy") == "0.3"
    assert table_value(screen, "text_length") == "4.5"
    assert "plugin_rewards.py" not in screen  # the plug-in's path would crowd the table
    assert "rewards/accuracy/std" not in screen


def test_no_metric_value_is_cut_on_a_narrow_terminal():
    dashboard = Dashboard(total_steps=10, console=recording_console(width=60), plain=False)
    dashboard.update(scripted_metrics(3)[-1])
    screen = screen_text(dashboard)
    for label, value in (("reward", "0.375"), ("loss", "-0.0369"), ("peak memory", "1.23 GB"), ("learning rate", "1e-05")):
        assert table_value(screen, label) == value, screen
    assert "…" not in screen


def test_whole_screen_fits_an_80_by_24_terminal():
    dashboard = Dashboard(total_steps=500, console=recording_console(width=80), plain=False)
    for m in scripted_metrics(300):  # sparklines longer than the screen is wide
        dashboard.update(m)
    dashboard.show_sample(SAMPLE)
    lines = screen_text(dashboard).splitlines()
    assert len(lines) <= 24, "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    assert any(line.startswith("KL ") and "▁" in line and "█" in line for line in lines)  # one line, not wrapped


def test_metric_the_table_does_not_know_shows_under_other():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    dashboard.update({**scripted_metrics(1)[0], "custom/metric": 0.625})
    screen = screen_text(dashboard)
    assert "other" in screen and table_value(screen, "custom/metric") == "0.625"


def test_sparklines_follow_reward_and_kl():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    for m in scripted_metrics(8):
        dashboard.update(m)
    lines = screen_text(dashboard).splitlines()
    reward_line = next(line for line in lines if line.startswith("reward ") and "▁" in line)
    kl_line = next(line for line in lines if line.startswith("KL ") and "▁" in line)
    # Both series rise evenly over 8 steps: one block higher each step.
    assert "▁▂▃▄▅▆▇█" in reward_line and "▁▂▃▄▅▆▇█" in kl_line
    assert "0.125 → 1" in reward_line and "(min 0.125, max 1)" in reward_line
    assert "0.0004 → 0.0032" in kl_line


def test_sample_panel_shows_best_and_worst_completion_with_rewards():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    dashboard.update(scripted_metrics(5)[-1])
    dashboard.show_sample(SAMPLE)
    screen = screen_text(dashboard)
    assert "sample · step 5" in screen
    assert "What is 12 plus 30?" in screen
    best = next(line for line in screen.splitlines() if "best" in line)
    worst = next(line for line in screen.splitlines() if "worst" in line)
    assert "best 2" in best and "<answer>42</answer>" in best
    assert "worst 0" in worst and "no idea" in worst
    assert "0.25 2 0" in screen  # every reward of the group
    # Neither the middle completion nor markup inside it is taken for the best/worst.
    assert "I guess 41" not in best + worst


def test_sample_text_with_markup_is_shown_verbatim():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    dashboard.show_sample({**SAMPLE, "rewards": [3.0, 2.0, 0.0]})
    assert "I guess 41 [bold]maybe[/bold]" in screen_text(dashboard)


def test_screen_before_the_first_step_says_it_is_waiting():
    dashboard = Dashboard(total_steps=7, console=recording_console(), plain=False)
    screen = screen_text(dashboard)
    assert "step 0/7" in screen and "waiting for the first step" in screen


# ---------------------------------------------------------------- plain lines off a terminal


def test_off_a_terminal_one_parseable_line_per_log_interval():
    out = io.StringIO()
    console = Console(file=out, width=80)  # a file, not a terminal: plain mode by itself
    metrics = scripted_metrics(10)
    with Dashboard(total_steps=10, console=console, log_every=3) as dashboard:
        assert dashboard.plain
        for m in metrics:
            dashboard.update(m)
    text = out.getvalue()
    assert not ANSI_OR_CONTROL.search(text.replace("\n", "")), repr(text)
    lines = text.splitlines()
    parsed = [parse_plain_line(line) for line in lines]
    assert [p["step"] for p in parsed] == [3, 6, 9, 10]  # every 3rd step and the last
    for p in parsed:
        m = metrics[p["step"] - 1]
        assert p["total_steps"] == 10
        assert p["sec_per_step"] == pytest.approx(2.0)
        for label, key in (("reward", "reward"), ("reward_std", "reward_std"), ("kl", "kl"), ("loss", "loss"),
                           ("len", "completions/mean_length"), ("accuracy", "rewards/accuracy/mean"),
                           ("text_length", f"rewards/{TEXT_REWARD}/mean")):
            assert p[label] == pytest.approx(m[key], rel=5e-3), (label, lines)


def test_plain_line_is_one_line_wider_than_the_console():
    out = io.StringIO()
    console = Console(file=out, width=30)
    with Dashboard(total_steps=10, console=console) as dashboard:
        dashboard.update(scripted_metrics(1)[0])
        dashboard.show_sample({**SAMPLE, "prompt": "line one\nline two\twith a tab\x1b[31m"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert parse_plain_line(lines[0])["reward"] == 0.125
    assert lines[1].startswith("sample step 5 | prompt line one line two with a tab")
    assert "best 2: <answer>42</answer>" in lines[1] and "worst 0: no idea" in lines[1]
    assert not ANSI_OR_CONTROL.search(out.getvalue().replace("\n", ""))


def test_parse_plain_line_reads_back_special_values():
    line = plain_line({"step": 2, "reward": float("nan"), "kl": 1.5e-7, "loss": 12345.0}, 9, 0.5)
    parsed = parse_plain_line(line)
    assert parsed["step"] == 2 and parsed["total_steps"] == 9 and parsed["sec_per_step"] == 0.5
    assert parsed["reward"] != parsed["reward"]  # NaN stays NaN
    assert parsed["kl"] == 1.5e-7 and parsed["loss"] == 12345.0
    with pytest.raises(ValueError):
        parse_plain_line("loading model")


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "value, kind, text",
    [
        (0.43751, "num", "0.438"),
        (1234.56, "num", "1235"),
        (0.0, "num", "0"),
        (7, "num", "7"),
        (0.125, "pct", "12.5%"),
        (1, "pct", "100%"),  # an integer fraction is still a fraction
        (2.5, "s", "2.5s"),
        (1.234, "gb", "1.23 GB"),
        (float("inf"), "num", "inf"),
    ],
)
def test_format_value(value, kind, text):
    assert format_value(value, kind) == text


def test_sparkline_buckets_long_series_and_drops_non_finite():
    assert sparkline([0, 1, float("nan"), 2]) == "▁▅█"
    assert sparkline([3, 3, 3]) == "▄▄▄"
    long = sparkline(list(range(600)), width=60)
    assert len(long) == 60 and long[0] == "▁" and long[-1] == "█"


# ---------------------------------------------------------------- metrics.jsonl


def test_truncated_last_line_is_skipped_and_cut_off_on_reopen(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 1, "reward": 0.5})
        logger.log({"step": 2, "reward": float("nan")})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "rew')  # killed mid-line
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["reward"] != records[1]["reward"]

    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 3, "reward": 0.75})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_samples_go_to_completions_jsonl(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"step": 1})
        logger.log_sample(SAMPLE)
    assert read_metrics(tmp_path / "completions.jsonl") == [SAMPLE]


def test_metrics_survive_sigkill_mid_run(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "1000",
            "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--lora-rank", "2",
            "--reward", TEXT_REWARD, "--save-every", "1000", "--sample-every", "1000", "--seed", "0"]
    code = "import sys; from grpo_mlx.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stdout = open(tmp_path / "stdout.txt", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=stdout, stderr=subprocess.STDOUT, env=env)
    metrics_path = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics_path.exists() and metrics_path.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "stdout.txt").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        stdout.close()
    assert proc.returncode == -signal.SIGKILL

    text = metrics_path.read_text()
    complete = text[: text.rfind("\n") + 1].splitlines()  # a line being written at the kill may be partial
    records = [json.loads(line) for line in complete]
    assert len(records) >= 3 and all(isinstance(r, dict) for r in records)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert read_metrics(run_dir) == records
    assert all("reward" in r and "kl" in r for r in records)
    assert (run_dir / "config.yaml").is_file()

    # Off a terminal the run printed plain lines that agree with metrics.jsonl.
    printed = [parse_plain_line(line) for line in (tmp_path / "stdout.txt").read_text().splitlines() if line.startswith("step ")]
    assert printed, (tmp_path / "stdout.txt").read_text()
    for p in printed:
        assert p["total_steps"] == 1000
        assert p["reward"] == pytest.approx(records[p["step"] - 1]["reward"], rel=5e-3, abs=1e-9)


def test_resume_keeps_metric_lines_up_to_the_checkpoint_step(tmp_path):
    keep_metrics_until(tmp_path, 2)  # no metrics.jsonl yet: nothing to cut, nothing written
    assert not (tmp_path / "metrics.jsonl").exists()
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 2, 3, 4):
            logger.log({"step": step, "reward": step / 4})
    keep_metrics_until(tmp_path, 2)
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 0.25}, {"step": 2, "reward": 0.5}]


# ---------------------------------------------------------------- terminal or plain lines


@pytest.mark.parametrize("terminal, environ, plain", [(False, {}, True), (True, {"TERM": "dumb"}, True), (True, {"TERM": "xterm"}, False)])
def test_dashboard_and_eval_progress_pick_plain_lines_the_same_way(terminal, environ, plain):
    from grpo_mlx.eval.evaluate import EvalProgress

    console = Console(file=io.StringIO(), force_terminal=terminal, _environ=environ)
    assert wants_plain_lines(console) is plain
    assert Dashboard(total_steps=3, console=console).plain is plain
    assert EvalProgress(console).plain is plain
