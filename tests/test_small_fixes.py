"""Small things users hit: no `kl` without a KL penalty, `generate` streams, the loss hint at mu = 1."""

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from grpo_mlx.cli import cli, stream_completion
from grpo_mlx.ui.dashboard import LOSS_HINT, Dashboard
from test_dashboard import SAMPLE, recording_console, scripted_metrics, screen_text

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"


def train_cli(tiny_model_dir, out, *extra):
    args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "2", "--batch-size", "1",
            "--group-size", "2", "--max-tokens", "4", "--reward", TEXT_REWARD, "--sample-every", "100", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- kl without a KL penalty


def test_beta_zero_leaves_kl_out_of_metrics_and_the_plain_lines(tiny_model_dir, tmp_path):
    output, records = train_cli(tiny_model_dir, tmp_path / "off", "--beta", "0")
    assert len(records) == 2 and all("kl" not in r and "loss" in r for r in records)
    lines = [line for line in output.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("| kl " not in line and "| loss " in line for line in lines)
    _, records = train_cli(tiny_model_dir, tmp_path / "on", "--beta", "0.04")
    assert all(r["kl"] >= 0 for r in records)  # with a penalty it is measured and logged


def test_the_screen_has_no_kl_row_or_sparkline_without_kl():
    dashboard = Dashboard(total_steps=10, console=recording_console(), plain=False)
    for m in scripted_metrics(3):
        dashboard.update({k: v for k, v in m.items() if k != "kl"})
    screen = screen_text(dashboard)
    assert "loss" in screen and "KL" not in screen


# ---------------------------------------------------------------- generate streams


def test_stream_completion_hands_text_over_in_pieces_that_make_mlx_lm_generate_text(tiny_model_dir):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(tiny_model_dir))
    prompt = tokenizer.encode("What is 12 plus 30?")
    pieces = []
    text = stream_completion(model, tokenizer, prompt, 12, make_sampler(0.0), pieces.append)
    assert len(pieces) > 1  # piece by piece, not once at the end
    assert "".join(pieces) == text == generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(0.0))


def test_generate_command_writes_the_completion_as_it_is_decoded(tiny_model_dir, monkeypatch):
    writes = []
    echo = click.echo
    monkeypatch.setattr(click, "echo", lambda message=None, **kw: (writes.append(message), echo(message, **kw)))
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir), "--prompt", "What is 12 plus 30?",
                                      "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    pieces = [w for w in writes if w]
    assert len(pieces) > 1 and result.output == "".join(pieces) + "\n"


# ---------------------------------------------------------------- why the loss sits near 0


def test_the_loss_hint_shows_at_mu_1_only_and_the_screen_still_fits_80_by_24():
    with_hint = Dashboard(total_steps=500, console=recording_console(width=80), plain=False, num_iterations=1)
    without = Dashboard(total_steps=500, console=recording_console(width=80), plain=False, num_iterations=2)
    for dashboard in (with_hint, without):
        for m in scripted_metrics(300):
            dashboard.update({**m, "eval/accuracy": 0.5})  # with --eval-every's row too
        dashboard.show_sample(SAMPLE)
    lines = screen_text(with_hint).splitlines()
    assert LOSS_HINT in lines and len(lines) <= 24 and max(map(len, lines)) <= 80
    assert "μ=1" not in screen_text(without)


def test_plain_lines_give_the_hint_once(tiny_model_dir, tmp_path):
    output, _ = train_cli(tiny_model_dir, tmp_path / "mu1")
    assert output.count(f"note: {LOSS_HINT}") == 1
    assert output.index("note: ") < output.index("step 1/2")
    output, _ = train_cli(tiny_model_dir, tmp_path / "mu2", "--num-iterations", "2")
    assert "note: " not in output


# ---------------------------------------------------------------- python -m grpo_mlx.cli


def test_python_dash_m_cli_runs_the_cli_not_nothing():
    """`python -m grpo_mlx.cli ...` used to import the module and exit 0 silently, whatever the arguments."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "grpo_mlx.cli", "plan", "--model", "qwen2.5-0.5b", "--memory-limit", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "memory_limit" in out.stderr and "must be > 0" in out.stderr, out.stderr


# ---------------------------------------------------------------- eval of a tools run without --tools


@pytest.mark.parametrize("trained, flag", [("tools:\n- calculator\n", "--tools calculator"),
                                           ("env: my_env.py:MyEnv\n", "--env my_env.py:MyEnv"),
                                           ("tools:\n- python\ntool_sandbox: guard-only\n",
                                            "--tools python --tool-sandbox guard-only")])
def test_eval_of_a_multi_turn_run_without_its_tools_says_how_to_evaluate_as_trained(tmp_path, trained, flag):
    """It used to evaluate single-turn in silence: a tool-trained run scored far below its training."""
    (tmp_path / "config.yaml").write_text(f"model: /nowhere\n{trained}")
    result = CliRunner().invoke(cli, ["eval", "--adapter-path", str(tmp_path), "--dataset", "/nowhere.jsonl"])
    assert f"was trained with {flag}, this eval has none" in result.output and f"add {flag}" in result.output
    with_tools = CliRunner().invoke(cli, ["eval", "--adapter-path", str(tmp_path), "--dataset", "/nowhere.jsonl",
                                          *flag.split(" ", 1)])
    assert "was trained with" not in with_tools.output
