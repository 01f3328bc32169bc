"""Run directories: --overwrite removes only a run grpo-mlx wrote, and only once the new run has loaded;
a live run is locked; --resume never starts over and never loads adapters that do not fit."""

import shutil
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from grpo_mlx.train.checkpoint import load_latest_checkpoint
from grpo_mlx.train.run_dir import RUN_LOCK, RUN_MARKER
from test_reliability import STEPS, TEXT_REWARD, metric_steps, run_main, start_and_wait_for_step, train_args


def short_args(model_dir, output, steps=2, *extra):
    return ["train", "--model", str(model_dir), "--output", str(output), "--steps", str(steps),
            "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--reward", TEXT_REWARD,
            "--save-every", "1", "--seed", "3", *map(str, extra)]


def snapshot(folder) -> dict:
    """Every file under `folder` (the lock file aside, which a run rewrites) and its bytes."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RUN_LOCK}


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def checkpoint_names(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-step run (rank 8, all layers, scale 20), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_main(short_args(tiny_model_dir, out, 2)) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ---------------------------------------------------------------- --overwrite


def test_overwrite_replaces_a_real_run(run_copy, tiny_model_dir):
    old_adapters = (run_copy / "adapters.safetensors").read_bytes()
    (run_copy / "completions.jsonl").write_text("{}\n")  # a run file the new run will not write
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--overwrite", "--seed", "4")) == 0
    assert checkpoint_names(run_copy) == ["step-000001"]
    assert metric_steps(run_copy) == [1]
    assert (run_copy / "adapters.safetensors").read_bytes() != old_adapters
    assert (run_copy / RUN_MARKER).is_file()
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert saved["seed"] == 4 and "overwrite" not in saved and "resume" not in saved


def test_overwrite_refuses_a_run_holding_a_foreign_file(run_copy, tiny_model_dir, capsys):
    (run_copy / "notes.txt").write_text("my notes")
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--overwrite")) == 2
    line = error_line(capsys)
    assert "notes.txt" in line and "did not write" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("user_path", ["checkpoints/notes.txt", "checkpoints/best/adapters.safetensors",
                                       "checkpoints/step-000001/notes.txt"])
def test_overwrite_refuses_user_files_inside_checkpoints(user_path, run_copy, tiny_model_dir, capsys):
    (run_copy / user_path).parent.mkdir(parents=True, exist_ok=True)
    (run_copy / user_path).write_text("the user's own")
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--overwrite")) == 2
    line = error_line(capsys)
    assert user_path.rsplit("/", 1)[0] in line and "did not write" in line
    assert snapshot(run_copy) == before


def test_resume_of_a_run_already_at_steps_says_so_and_changes_nothing(run_copy, tiny_model_dir, capsys):
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--resume")) == 2
    line = error_line(capsys)
    assert "already at step 2" in line and "--steps" in line
    assert snapshot(run_copy) == before


def test_overwrite_refuses_a_run_without_the_marker(run_copy, tiny_model_dir, capsys):
    """A run from an older grpo-mlx (no marker) is never deleted: the user deletes it by hand."""
    (run_copy / RUN_MARKER).unlink()
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--overwrite")) == 2
    line = error_line(capsys)
    assert RUN_MARKER in line and "delete it by hand" in line
    assert snapshot(run_copy) == before


def test_overwrite_of_a_project_folder_deletes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "steps": 1, "batch_size": 1,
                                                          "group_size": 2, "max_tokens": 4, "reward": [TEXT_REWARD]}))
    (project / "notes.md").write_text("notes")
    (project / "data").mkdir()
    (project / "data" / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert run_main(["train", "--config", "config.yaml", "--output", ".", "--overwrite"]) == 2
    assert "did not write" in error_line(capsys)
    assert snapshot(project) == before
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "data", "notes.md"]
    # Without --overwrite the folder is refused too: a run never writes among the user's files.
    assert run_main(["train", "--config", "config.yaml", "--output", "."]) == 2
    assert "new or empty folder" in error_line(capsys)
    assert snapshot(project) == before


@pytest.mark.parametrize("bad", ["dataset", "reward", "model"])
def test_overwrite_that_fails_validation_leaves_the_old_run_intact(bad, run_copy, tiny_model_dir, tmp_path, capsys):
    extra = {"dataset": ["--dataset", tmp_path / "typo.jsonl"],
             "reward": ["--reward", f"{tmp_path / 'no_plugin.py'}:score"],
             "model": ["--model", tmp_path / "no_model"]}[bad]
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 1, "--overwrite", *extra)) == 2
    error_line(capsys)
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- one-shot actions stay off config files


def test_a_runs_config_yaml_reused_as_config_replays_no_action(run_copy, tiny_model_dir, tmp_path, capsys):
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert "overwrite" not in saved and "resume" not in saved
    keep = tmp_path / "keep"
    shutil.copytree(run_copy, keep)
    before = snapshot(keep)
    # A config.yaml written by an older version, with overwrite: true in it.
    old_style = tmp_path / "old.yaml"
    old_style.write_text(yaml.safe_dump({**saved, "overwrite": True, "resume": False}))
    assert run_main(["train", "--config", str(old_style), "--output", str(keep)]) == 2
    line = error_line(capsys)
    assert "overwrite: true" in line and "--overwrite on the command line" in line
    assert snapshot(keep) == before
    # false is ignored: the run's own config.yaml, reused, is refused as "already holds a run".
    old_style.write_text(yaml.safe_dump({**saved, "overwrite": False, "resume": False}))
    assert run_main(["train", "--config", str(old_style), "--output", str(keep)]) == 2
    assert "already holds a run" in error_line(capsys)
    assert snapshot(keep) == before


# ---------------------------------------------------------------- a live run is locked


def test_a_live_run_is_locked_and_sigkill_leaves_no_stale_lock(tiny_model_dir, tmp_path, capsys):
    slow = tmp_path / "slow.py"  # text_length's rewards, slowed so that the run outlives the checks below
    slow.write_text("import time\n\ndef slow(completions, answers, **fields):\n"
                    "    time.sleep(0.5)\n    return [len(c) / 10 for c in completions]\n")
    out = tmp_path / "run"
    proc = start_and_wait_for_step(tiny_model_dir, out, 1, "--reward", f"{slow}:slow")
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert run_main(train_args(tiny_model_dir, out, STEPS, *extra)) == 2, extra
            line = error_line(capsys)
            assert "in use by a running grpo-mlx train" in line and str(proc.pid) in line, line
        assert proc.poll() is None  # the first run is still training, its directory in place
        assert (out / RUN_MARKER).is_file() and (out / "checkpoints").is_dir()
    finally:
        proc.kill()
        proc.wait(timeout=60)
    saved = load_latest_checkpoint(out)[2]["step"]
    assert run_main(train_args(tiny_model_dir, out, saved + 1, "--resume")) == 0
    assert f"resumed from step-{saved:06d}" in capsys.readouterr().out
    assert metric_steps(out) == list(range(1, saved + 2))


# ---------------------------------------------------------------- --resume never starts over


@pytest.mark.parametrize("damage", ["checkpoints_removed", "all_damaged"])
def test_resume_without_a_readable_checkpoint_is_refused(damage, run_copy, tiny_model_dir, capsys):
    if damage == "checkpoints_removed":
        shutil.rmtree(run_copy / "checkpoints")
    else:
        for name in checkpoint_names(run_copy):
            (run_copy / "checkpoints" / name / "adapters.safetensors").write_bytes(b"not safetensors")
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 4, "--resume")) == 2
    line = error_line(capsys)
    assert "checkpoint in" in line and "--overwrite" in line
    assert snapshot(run_copy) == before  # adapters.safetensors and metrics.jsonl untouched


@pytest.mark.parametrize("extra, named", [(["--lora-rank", "4"], "--lora-rank: 8 -> 4"),
                                          (["--lora-layers", "1"], "--lora-layers: 2 -> 1"),
                                          (["--lora-scale", "1"], "--lora-scale: 20.0 -> 1.0")],
                         ids=["rank", "layers", "scale"])
def test_resume_with_other_adapter_settings_is_refused_without_config_yaml(extra, named, run_copy, tiny_model_dir, capsys):
    (run_copy / "config.yaml").unlink()
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 3, "--resume", *extra)) == 2
    line = error_line(capsys)
    assert "does not fit" in line and named in line, line
    assert snapshot(run_copy) == before


def test_resume_refuses_a_checkpoint_whose_tensors_do_not_fit(run_copy, tiny_model_dir, capsys):
    for name in checkpoint_names(run_copy):  # every checkpoint lacks one adapter tensor
        path = run_copy / "checkpoints" / name / "adapters.safetensors"
        weights = dict(mx.load(str(path)))
        weights.pop(sorted(weights)[0])
        mx.save_safetensors(str(path), weights)
    before = snapshot(run_copy)
    assert run_main(short_args(tiny_model_dir, run_copy, 3, "--resume")) == 2
    line = error_line(capsys)
    assert "does not fit" in line and "1 adapter tensors missing" in line, line
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- failures and pruning


def test_reward_failing_before_the_first_save_saves_nothing(tiny_model_dir, tmp_path, capsys):
    # Passes the trial call (completions are the gold answers there), fails on real completions at step 1.
    plugin = tmp_path / "strict.py"
    plugin.write_text("def strict(completions, answers, **fields):\n"
                      "    if list(completions) != list(answers):\n"
                      "        raise ValueError('only gold answers are scored')\n"
                      "    return [1.0] * len(completions)\n")
    out = tmp_path / "run"
    assert run_main(short_args(tiny_model_dir, out, 2, "--reward", f"{plugin}:strict")) == 2
    line = error_line(capsys)
    assert "only gold answers are scored" in line and "no step completed, nothing saved" in line
    assert not (out / "checkpoints").exists() and not (out / "adapters.safetensors").exists()
    assert (out / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("keep", [1, 2])
def test_keep_checkpoints_keeps_exactly_the_newest(keep, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run_main(short_args(tiny_model_dir, out, 4, "--keep-checkpoints", keep)) == 0
    assert checkpoint_names(out) == [f"step-{s:06d}" for s in range(5 - keep, 5)]
