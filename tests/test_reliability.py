"""Reliability: a user error is one clear line, a crash loses at most one step, a NaN never spoils a run.

The reference is one uninterrupted run that keeps a checkpoint of every step, so
each interrupted-and-resumed run is compared with the reference's adapters at
the step it ends on.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import grpo_mlx.train.trainer as trainer
from grpo_mlx.train.checkpoint import load_latest_checkpoint
from grpo_mlx.cli import main
from grpo_mlx.data.examples import epoch_order

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
# Reference run length. Interrupted runs are stopped after step 2: 6 more steps leave a signal time to
# land mid-run, and --keep-checkpoints 3 something to prune.
STEPS = 8
CHILD = [sys.executable, "-c", "from grpo_mlx.cli import main; main()"]


def train_args(model_dir, output, steps=STEPS, *extra):
    return ["train", "--model", str(model_dir), "--output", str(output), "--steps", str(steps),
            "--batch-size", "2", "--group-size", "4", "--max-tokens", "6", "--learning-rate", "0.02",
            "--reward", TEXT_REWARD, "--save-every", "1", "--seed", "5", *map(str, extra)]


def run_main(args) -> int:
    """`grpo-mlx ARGS` in this process: its exit status."""
    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


def adapters(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_adapters(path, expected_path):
    got, want = adapters(path), adapters(expected_path)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-5, err_msg=k)


def step_adapters(run_dir, step):
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}" / "adapters.safetensors"


def metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run with every step's checkpoint kept."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_main(train_args(tiny_model_dir, out, STEPS, "--keep-checkpoints", STEPS)) == 0
    return out


# ---------------------------------------------------------------- user errors: one line, exit 2


@pytest.fixture
def inputs(tmp_path):
    """Broken files for the error table, by name."""
    files = {
        "empty": tmp_path / "empty.jsonl",
        "not_json": tmp_path / "not_json.jsonl",
        "no_fields": tmp_path / "no_fields.jsonl",
        "all_bad": tmp_path / "all_bad.jsonl",
        "broken_plugin": tmp_path / "broken_plugin.py",
        "failing_plugin": tmp_path / "failing_plugin.py",
        "nan_plugin": tmp_path / "nan_plugin.py",
        "a_file": tmp_path / "a_file",
    }
    files["empty"].write_text("")
    files["not_json"].write_text("this is { not json\n")
    files["no_fields"].write_text('{"foo": 1, "bar": 2}\n')
    files["all_bad"].write_text('{"question": null, "answer": "1"}\n{"question": "q", "answer": [1, 2]}\n')
    files["broken_plugin"].write_text("import no_such_module_here\n")
    files["failing_plugin"].write_text("def score(completions, answers, **fields):\n    raise KeyError('gold')\n")
    files["nan_plugin"].write_text("def score(completions, answers, **fields):\n    return [float('nan')] * len(completions)\n")
    files["a_file"].write_text("")
    held = tmp_path / "held"  # a directory that already holds a run with rank-2 adapters
    held.mkdir()
    (held / "config.yaml").write_text("lora_rank: 2\n")
    files["held"] = held
    return files


# (name, args after the common ones, text the one line must contain)
ERRORS = [
    ("model_missing", ["--model", "{tmp}/no_model"], "not found"),
    ("model_hub_unreachable", ["--model", "no-such-org/no-such-model"], "network"),
    ("data_missing", ["--dataset", "{tmp}/missing.jsonl"], "no such file"),
    ("data_empty", ["--dataset", "{empty}"], "is empty"),
    ("data_not_json", ["--dataset", "{not_json}"], "not valid JSON"),
    ("data_without_prompt_field", ["--dataset", "{no_fields}"], "none of the prompt fields"),
    ("data_named_field_missing", ["--dataset", "{no_fields}", "--prompt-field", "question"], "no prompt field 'question'"),
    ("data_all_rows_bad", ["--dataset", "{all_bad}"], "all 2 rows"),
    ("group_size_1", ["--group-size", "1"], "group_size=1"),
    ("negative_beta", ["--beta", "-0.1"], "beta=-0.1"),
    ("epsilon_above_1", ["--epsilon", "1.5"], "epsilon=1.5"),
    ("epsilon_0", ["--epsilon", "0"], "epsilon=0.0"),
    ("max_tokens_0", ["--max-tokens", "0"], "max_tokens=0"),
    ("unknown_loss_type", ["--loss-type", "ppo"], "'--loss-type': 'ppo' is not one of 'grpo'"),
    ("unknown_reward", ["--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
    ("plugin_file_missing", ["--reward", "{tmp}/nowhere.py:score"], "not found"),
    ("plugin_import_fails", ["--reward", "{broken_plugin}:score"], "importing"),
    ("plugin_function_missing", ["--reward", "{failing_plugin}:nope"], "no function 'nope'"),
    ("plugin_fails_on_trial", ["--reward", "{failing_plugin}:score"], "trial call"),
    ("plugin_returns_nan", ["--reward", "{nan_plugin}:score"], "returned nan"),
    ("output_holds_a_run", ["--output", "{held}"], "already holds a run"),
    ("resume_a_different_run", ["--output", "{held}", "--resume"], "lora_rank 2 -> 8"),
    ("resume_nothing", ["--output", "{tmp}/fresh", "--resume"], "nothing to resume"),
    ("output_is_a_file", ["--output", "{a_file}"], "is a file"),
    ("config_file_missing", ["--config", "{tmp}/missing.yaml"], "config file"),
]


@pytest.mark.parametrize("name, extra, expected", ERRORS, ids=[e[0] for e in ERRORS])
def test_user_error_is_one_line_with_exit_status_2(name, extra, expected, tiny_model_dir, tmp_path, inputs, capsys):
    names = {k: str(v) for k, v in inputs.items()} | {"tmp": str(tmp_path)}
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--lora-rank", "8"]
    args += [a.format(**names) for a in extra]  # later flags win

    status = run_main(args)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_debug_flag_shows_the_traceback(tiny_model_dir, tmp_path):
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--group-size", "1", "--debug"]
    result = subprocess.run(CHILD + args, capture_output=True, text=True, timeout=120)
    assert result.returncode not in (0, 2)
    assert "Traceback" in result.stderr and "UserError" in result.stderr and "group_size=1" in result.stderr


def test_bad_rows_are_skipped_with_a_count_shown(tiny_model_dir, tmp_path, capsys):
    rows = [{"question": "What is 1 plus 2?", "answer": "3"}, {"question": None, "answer": "4"},
            {"question": "What is 2 plus 2?", "answer": 4}, {"question": "q", "answer": [5]}, {"question": "", "answer": "6"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_args(tiny_model_dir, tmp_path / "run", 1, "--dataset", data)
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 3 bad rows of 5" in out


# ---------------------------------------------------------------- crashes lose at most one step


def start_and_wait_for_step(model_dir, out, step, *extra, stdout=subprocess.DEVNULL):
    """Start a training subprocess; return it once checkpoint `step` exists, still running."""
    proc = subprocess.Popen(CHILD + train_args(model_dir, out, STEPS, *extra), stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not step_adapters(out, step).parent.exists():
        assert proc.poll() is None, f"training ended before step {step}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.005)
    return proc


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(reference, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_step(tiny_model_dir, out, 2)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert run_main(train_args(tiny_model_dir, out, STEPS, "--resume")) == 0
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, STEPS))
    assert metric_steps(out) == list(range(1, STEPS + 1))
    # The last --keep-checkpoints (3) are kept, and no half-written directory is left behind.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in range(STEPS - 2, STEPS + 1)]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_step_exits_128_plus_signal_and_resume_matches(sig, status, reference, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_step(tiny_model_dir, out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    saved = load_latest_checkpoint(out)[2]["step"]
    assert 2 <= saved < STEPS
    assert f"interrupted: saved step {saved}" in err and "Traceback" not in err
    assert metric_steps(out) == list(range(1, saved + 1))  # the step in flight finished and was saved
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, saved))

    assert run_main(train_args(tiny_model_dir, out, STEPS, "--resume")) == 0
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, STEPS))


def test_second_ctrl_c_quits_at_once_and_the_run_stays_resumable(reference, tiny_model_dir, tmp_path):
    # text_length's rewards, slowed down so that the second Ctrl-C lands mid-step.
    slow = tmp_path / "slow.py"
    slow.write_text(f"import sys, time\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "from plugin_rewards import text_length\n\n"
                    "def slow_text_length(completions, answers, **fields):\n"
                    "    time.sleep(0.5)\n"
                    "    return text_length(completions, answers)\n")
    out = tmp_path / "run"
    proc = start_and_wait_for_step(tiny_model_dir, out, 2, "--reward", f"{slow}:slow_text_length", stdout=subprocess.PIPE)
    proc.send_signal(signal.SIGINT)
    while "stopping after this step" not in proc.stdout.readline():  # the first one was handled
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "aborted" in err and "interrupted: saved" not in err
    assert "Traceback" not in err
    assert run_main(train_args(tiny_model_dir, out, STEPS, "--resume")) == 0
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, STEPS))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    latest = step_adapters(out, STEPS)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    assert run_main(train_args(tiny_model_dir, out, STEPS, "--resume")) == 0
    stdout = capsys.readouterr().out
    assert f"step-{STEPS:06d} is unreadable" in stdout and f"resumed from step-{STEPS - 1:06d}" in stdout
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, STEPS))


def test_reward_plugin_failing_mid_run_stops_cleanly_naming_plugin_and_example(tiny_model_dir, tmp_path, capsys):
    questions = [f"What is {i} plus 1?" for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": str(i + 1)}) + "\n" for i, q in enumerate(questions)))
    plugin = tmp_path / "picky.py"
    plugin.write_text("def picky(completions, answers, **fields):\n"
                      "    if '4' in answers:\n"
                      "        raise ValueError('cannot score 4')\n"
                      "    return [len(c) / 10 for c in completions]\n")
    # The trial call sees rows 0 and 1; pick a seed that reaches row 3 (answer 4) at step 2 or later.
    seed = next(s for s in range(100) if epoch_order(4, s, 0).index(3) >= 1)
    failing_step = epoch_order(4, seed, 0).index(3) + 1
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--steps", "4",
            "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--dataset", str(data),
            "--reward", f"{plugin}:picky", "--save-every", "1", "--seed", str(seed)]
    assert run_main(args) == 2
    line, = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "picky" in line and "cannot score 4" in line and questions[3] in line and f"step {failing_step}" in line
    state = load_latest_checkpoint(tmp_path / "run")[2]
    assert (state["step"], state["data_position"]) == (failing_step - 1, failing_step - 1)
    assert metric_steps(tmp_path / "run") == list(range(1, failing_step))


# ---------------------------------------------------------------- non-finite steps


def nan_advantages_at(calls_to_poison, monkeypatch):
    """Make group_advantages return NaN on the given (1-based) calls: one call per step."""
    real, calls = trainer.group_advantages, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        advantages = real(*args, **kwargs)
        return advantages * float("nan") if calls_to_poison(len(calls)) else advantages

    monkeypatch.setattr(trainer, "group_advantages", poisoned)


def trainable(run) -> dict:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}


def test_nan_loss_skips_the_update_and_leaves_adapters_finite(tiny_model_dir, tmp_path, monkeypatch):
    from grpo_mlx.core.config import build_config

    nan_advantages_at(lambda call: call == 2, monkeypatch)
    config = build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "run"), steps=3, batch_size=2,
                                   group_size=4, max_tokens=6, learning_rate=0.02, reward=[TEXT_REWARD], seed=5))
    run = trainer.setup(config)
    seen = []
    for metrics, _ in trainer.train(run):
        seen.append((metrics, trainable(run)))
    assert [m["skipped_update"] for m, _ in seen] == [0.0, 1.0, 0.0]
    assert not np.isfinite(seen[1][0]["loss"])
    for k, before in seen[0][1].items():
        np.testing.assert_array_equal(seen[1][1][k], before)  # the NaN step changed nothing
    assert all(np.isfinite(v).all() for v in seen[2][1].values())
    assert any(not np.array_equal(seen[2][1][k], v) for k, v in seen[1][1].items())  # training went on
    assert run.bad_steps == 0


def test_max_bad_steps_in_a_row_stop_the_run_with_good_adapters_on_disk(reference, tiny_model_dir, tmp_path, monkeypatch, capsys):
    nan_advantages_at(lambda call: call >= 2, monkeypatch)  # step 1 trains, every later step is NaN
    out = tmp_path / "run"
    assert run_main(train_args(tiny_model_dir, out, trainer.MAX_BAD_STEPS + 1)) == 2
    line, = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert f"{trainer.MAX_BAD_STEPS} steps in a row had a non-finite loss" in line and "--resume" in line
    # Stopped during step MAX_BAD_STEPS + 1; the saved adapters are step 1's, the last good update.
    state = load_latest_checkpoint(out)[2]
    assert state["step"] == trainer.MAX_BAD_STEPS
    assert state["data_position"] == trainer.MAX_BAD_STEPS * 2  # the failed step's prompts are drawn again on --resume
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, 1))
    assert all(np.isfinite(v).all() for v in adapters(out / "adapters.safetensors").values())


# ---------------------------------------------------------------- disk full while saving


def fail_second_checkpoint(how, monkeypatch):
    """Make the 2nd checkpoint's write fail half-way with a full disk, as each layer reports it."""
    if how == "save_safetensors":
        real, calls = mx.save_safetensors, []

        def save(path, arrays, *args, **kwargs):
            calls.append(path)
            real(path, arrays, *args, **kwargs)
            if len(calls) == 4:  # checkpoint 2's optimizer state: its adapters are already written
                Path(path).write_bytes(Path(path).read_bytes()[:100])
                # MLX's own report of a failed write (seen writing to /dev/full): a RuntimeError, not an OSError.
                raise RuntimeError("[write] Unable to write 8 bytes to file.")

        monkeypatch.setattr(mx, "save_safetensors", save)
    else:
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "step-000002":  # every file written, the final rename fails
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("how", ["save_safetensors", "replace"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(how, reference, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fail_second_checkpoint(how, monkeypatch)
    assert run_main(train_args(tiny_model_dir, out, 2)) == 2
    line, = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "could not save checkpoint step 2" in line and "--resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no half-written leftovers
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, 1))

    monkeypatch.undo()
    assert run_main(train_args(tiny_model_dir, out, 2, "--resume")) == 0
    assert_same_adapters(out / "adapters.safetensors", step_adapters(reference, 2))
