"""--eval-every: greedy accuracy on a held-out set during training, equal to `grpo-mlx eval` on the
step's checkpoint; the best step's adapters in best/, kept across --resume."""

import io
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from rich.console import Console

from grpo_mlx.train.checkpoint import BEST, read_best, save_best
from grpo_mlx.train.run_dir import foreign_entries
from grpo_mlx.core.config import build_config
from grpo_mlx.ui.dashboard import Dashboard, parse_plain_line
from grpo_mlx.data.examples import load_examples
from grpo_mlx.core.errors import UserError
from grpo_mlx.eval.heldout import load_heldout
from grpo_mlx.ui.run_log import read_metrics
from test_reliability import adapters as tensors, run_main

STEPS, LIMIT = 4, 32
# The embedded demo model (0.8M parameters, 2-digit addition): its held-out accuracy is far from 0,
# so the step-by-step comparison compares something. batch 2 x group 4: eval decodes 8 prompts at
# a time, `grpo-mlx eval`'s default --batch-size.
RUN_ARGS = ["--steps", str(STEPS), "--batch-size", "2", "--group-size", "4", "--save-every", "1",
            "--keep-checkpoints", "10"]
EVAL_ARGS = ["--eval-every", "1", "--eval-limit", str(LIMIT)]


def assert_same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys() and got
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def eval_steps(run_dir) -> dict[int, float]:
    return {m["step"]: m["eval/accuracy"] for m in read_metrics(run_dir) if "eval/accuracy" in m}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("heldout") / "run"
    assert run_main(["train", "--output", str(run_dir), *RUN_ARGS, *EVAL_ARGS]) == 0
    return run_dir


def test_each_steps_eval_accuracy_is_what_grpo_mlx_eval_gives_for_its_checkpoint(evaluated_run, tmp_path):
    accuracies = eval_steps(evaluated_run)
    assert list(accuracies) == list(range(1, STEPS + 1))
    assert max(accuracies.values()) > 0  # the comparison below compares something
    for step, accuracy in accuracies.items():
        result = tmp_path / f"step{step}.json"
        checkpoint = evaluated_run / "checkpoints" / f"step-{step:06d}"
        assert run_main(["eval", "--adapter-path", str(checkpoint), "--dataset", "arithmetic", "--split", "test",
                         "--limit", str(LIMIT), "--output", str(result)]) == 0
        assert json.loads(result.read_text())["accuracy"] == accuracy, step


def test_best_holds_the_best_steps_adapters_and_loads_with_mlx_lm(evaluated_run):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from grpo_mlx.model.tiny_model import demo_model_path

    accuracies = eval_steps(evaluated_run)
    best_step = max(accuracies, key=lambda step: (accuracies[step], -step))  # the first of the best
    record = read_best(evaluated_run)
    assert record["step"] == best_step and record["eval/accuracy"] == accuracies[best_step]
    best = tensors(evaluated_run / BEST / "adapters.safetensors")
    assert_same_tensors(best, tensors(evaluated_run / "checkpoints" / f"step-{best_step:06d}" / "adapters.safetensors"))
    model, _ = load(str(demo_model_path()), adapter_path=str(evaluated_run / BEST))
    loaded = dict(tree_flatten(model.parameters()))
    assert_same_tensors({k: np.array(loaded[k]) for k in best}, best)
    assert foreign_entries(evaluated_run) == []  # best/ is the run's own: --overwrite replaces such a run


def test_evaluating_changes_nothing_in_the_training(evaluated_run, tmp_path):
    plain = tmp_path / "plain"
    assert run_main(["train", "--output", str(plain), *RUN_ARGS]) == 0
    assert_same_tensors(tensors(plain / "adapters.safetensors"), tensors(evaluated_run / "adapters.safetensors"))
    assert not (plain / BEST).exists() and not eval_steps(plain)


@pytest.mark.parametrize("recorded, replaced", [(1.0, False), (-1.0, True)], ids=["better-kept", "worse-replaced"])
def test_resume_keeps_the_best_score(recorded, replaced, evaluated_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run, run_dir)
    record_path = run_dir / BEST / "eval.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "eval/accuracy": recorded}))
    before = tensors(run_dir / BEST / "adapters.safetensors")
    assert run_main(["train", "--output", str(run_dir), *RUN_ARGS, *EVAL_ARGS, "--steps", str(STEPS + 2), "--resume"]) == 0
    accuracies = eval_steps(run_dir)
    assert list(accuracies) == list(range(1, STEPS + 3))
    best = read_best(run_dir)
    if replaced:  # the resumed steps' best beats the recorded -1
        new_step = max((STEPS + 1, STEPS + 2), key=lambda step: (accuracies[step], -step))
        assert best["step"] == new_step and best["eval/accuracy"] == accuracies[new_step]
        assert_same_tensors(tensors(run_dir / BEST / "adapters.safetensors"),
                            tensors(run_dir / "checkpoints" / f"step-{new_step:06d}" / "adapters.safetensors"))
    else:  # no resumed step reaches the recorded 1.0
        assert best == {**record, "eval/accuracy": 1.0}
        assert_same_tensors(tensors(run_dir / BEST / "adapters.safetensors"), before)


# ---------------------------------------------------------------- the held-out set


def train_config(**values):
    return build_config({}, values)


def test_a_built_in_tasks_held_out_set_is_its_test_split_first_n():
    examples = load_heldout(train_config(eval_every=5, eval_limit=7, seed=3))
    assert examples == load_examples("arithmetic", split="test", limit=7, seed=3)
    assert load_heldout(train_config(eval_limit=7)) is None  # --eval-every unset: off


def write_rows(path: Path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))


def test_a_folders_test_file_is_the_held_out_set(tmp_path):
    write_rows(tmp_path / "train.jsonl", [("train q", "1")])
    write_rows(tmp_path / "test.jsonl", [(f"test q{i}", str(i)) for i in range(5)])
    examples = load_heldout(train_config(dataset=str(tmp_path), eval_every=2, eval_limit=3))
    assert [ex.prompt for ex in examples] == ["test q0", "test q1", "test q2"]


def test_a_single_training_file_has_no_held_out_split_and_an_eval_file_is_used_whole(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "mine.jsonl"
    write_rows(train, [("train q", "1")])
    write_rows(held, [("held q", "2")])
    with pytest.raises(UserError, match="found no held-out set in .*train.jsonl .*pass --eval-dataset"):
        load_heldout(train_config(dataset=str(train), eval_every=1))
    examples = load_heldout(train_config(dataset=str(train), eval_every=1, eval_dataset=str(held)))
    assert [(ex.prompt, ex.answer) for ex in examples] == [("held q", "2")]


def test_a_bad_eval_dataset_is_one_line_before_the_model_loads(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_main(["train", "--output", str(run_dir), "--eval-every", "1", "--eval-dataset", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "found no held-out set" in err[0] and "no such file" in err[0]
    assert "loading model" not in capsys.readouterr().out


# ---------------------------------------------------------------- best/ on disk, the dashboard


class Adapters(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.lora = nn.Linear(2, 2)
        self.lora.weight = mx.full((2, 2), value)


def test_a_swap_cut_short_leaves_the_previous_best_found_and_restored(tmp_path):
    save_best(tmp_path, Adapters(1.0), {"a": 1}, {"step": 1, "eval/accuracy": 0.5})
    (tmp_path / BEST).rename(tmp_path / f".old-{BEST}")  # a crash between save_best's two renames
    assert read_best(tmp_path)["step"] == 1
    save_best(tmp_path, Adapters(2.0), {"a": 1}, {"step": 2, "eval/accuracy": 0.75})
    assert read_best(tmp_path)["step"] == 2 and not (tmp_path / f".old-{BEST}").exists()
    assert float(mx.load(str(tmp_path / BEST / "adapters.safetensors"))["lora.weight"][0, 0]) == 2.0
    assert foreign_entries(tmp_path) == []


def test_the_dashboard_keeps_the_last_held_out_accuracy_between_evaluations():
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    dashboard = Dashboard(10, console=console, plain=True)
    dashboard.update({"step": 1, "reward": 0.5, "eval/accuracy": 0.25})
    dashboard.update({"step": 2, "reward": 0.6})
    lines = console.export_text().splitlines()
    assert parse_plain_line(lines[0])["eval"] == 0.25 and "eval" not in parse_plain_line(lines[1])
    screen = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    screen.print(dashboard.render())
    shown = screen.export_text()
    assert "held-out acc  25%" in shown  # step 2 did not evaluate: step 1's accuracy stays on the screen


def test_a_multi_turn_run_evaluates_with_its_environment(tiny_model_dir, tmp_path):
    """--env: the held-out trajectories run the environment's turns, as `grpo-mlx eval --env` runs them."""
    env = f"{Path(__file__).parent / 'plugin_envs.py'}:AlwaysAnswer"  # answers every turn: each trajectory runs --max-turns
    run_dir, result = tmp_path / "run", tmp_path / "eval.json"
    common = ["--model", str(tiny_model_dir), "--env", env, "--max-turns", "2", "--max-tokens", "3"]
    assert run_main(["train", *common, "--output", str(run_dir), "--steps", "1", "--batch-size", "2", "--group-size", "2",
                     "--eval-every", "1", "--eval-limit", "3", "--reward", "format"]) == 0
    (line,) = read_metrics(run_dir)
    assert line["eval/turns/mean"] == 2.0 and line["eval/tools/calls_per_trajectory"] == 2.0
    assert run_main(["eval", *common, "--adapter-path", str(run_dir), "--dataset", "arithmetic", "--limit", "3",
                     "--batch-size", "4", "--output", str(result)]) == 0
    assert json.loads(result.read_text())["accuracy"] == line["eval/accuracy"]
