"""`grpo-mlx fuse` never replaces what it did not write; adapters on the wrong base are one error line."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from grpo_mlx.cli import cli, main
from grpo_mlx.data.examples import Example
from grpo_mlx.data.prompts import render_prompt
from grpo_mlx.model.fuse import FUSE_MARKER, load_with_adapters
from grpo_mlx.model.tiny_model import demo_model_path

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """Real adapters (2 GRPO steps on the tiny model), shared by this module's tests."""
    run_dir = tmp_path_factory.mktemp("fuse") / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "2", "--batch-size", "2",
            "--group-size", "4", "--max-tokens", "6", "--learning-rate", "0.05", "--reward", TEXT_REWARD, "--seed", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return run_dir


def fuse(model, run_dir, output, *extra):
    return main(["fuse", "--model", str(model), "--adapter-path", str(run_dir), "--output", str(output), *extra])


def refused(capsys, call) -> str:
    """Run a CLI call that must exit 2; return its single stderr line."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def logits(model, tokenizer):
    return np.array(model(mx.array(render_prompt(tokenizer, Example("What is 21 plus 21?", "42")))[None]))


def test_fuse_refuses_to_write_into_the_run_directory(tiny_model_dir, trained_run, capsys):
    # Real adapters, so nothing but the run-directory rule stops this fuse.
    line = refused(capsys, lambda: fuse(tiny_model_dir, trained_run, trained_run / "fused"))
    assert "run directory" in line
    assert not (trained_run / "fused").exists()


def test_fuse_leaves_a_project_folder_untouched_with_or_without_overwrite(tiny_model_dir, trained_run, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my notes\n")
    (project / "config.json").write_text('{"mine": true}\n')
    before = snapshot(project)

    assert "not empty" in refused(capsys, lambda: fuse(tiny_model_dir, trained_run, project))
    # --overwrite replaces only an earlier export: these files are not one.
    line = refused(capsys, lambda: fuse(tiny_model_dir, trained_run, project, "--overwrite"))
    assert "README.md" in line and "did not write" in line
    assert snapshot(project) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # no temporary folder left beside it


def test_fuse_overwrite_replaces_an_earlier_export_whole(tiny_model_dir, trained_run, tmp_path, capsys):
    from mlx_lm.utils import load

    out = tmp_path / "fused"
    fuse(tiny_model_dir, trained_run, out)
    # As if the earlier export had been a two-shard model: a shard holding the *base* weights, which
    # mlx-lm's loader (it globs model*.safetensors) would let override the fused ones if it stayed.
    base, tokenizer = load(str(tiny_model_dir))
    stale = out / "model-00001-of-00002.safetensors"
    mx.save_safetensors(str(stale), dict(tree_flatten(base.parameters())))
    marker = json.loads((out / FUSE_MARKER).read_text())
    (out / FUSE_MARKER).write_text(json.dumps({**marker, "files": marker["files"] + [stale.name]}))

    assert "not empty" in refused(capsys, lambda: fuse(tiny_model_dir, trained_run, out))
    assert stale.exists()
    fuse(tiny_model_dir, trained_run, out, "--overwrite")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # neither the new nor the old copy is left

    fused, _ = load(str(out))
    adapted, _, _ = load_with_adapters(str(tiny_model_dir), trained_run)
    np.testing.assert_allclose(logits(fused, tokenizer), logits(adapted, tokenizer), atol=1e-4, rtol=1e-4)
    assert np.abs(logits(fused, tokenizer) - logits(base, tokenizer)).max() > 1e-2


def test_fuse_never_replaces_the_base_models_folder(tiny_model_dir, trained_run, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)  # a copy: a failing test must not damage the shared fixture
    before = snapshot(base)
    for extra in ([], ["--overwrite"]):
        assert "base model" in refused(capsys, lambda: fuse(base, trained_run, base, *extra))
    # Nor a folder holding it: replacing that would remove the base too.
    assert "base model" in refused(capsys, lambda: fuse(base, trained_run, tmp_path, "--overwrite"))
    # Nor a folder inside it: the export would sit among the base's own files.
    assert "base model" in refused(capsys, lambda: fuse(base, trained_run, base / "fused"))
    assert snapshot(base) == before and not (base / "fused").exists()


@pytest.mark.parametrize("command", ["fuse", "eval", "generate"])
def test_adapters_on_another_base_model_are_one_error_line(trained_run, tmp_path, capsys, command):
    other = str(demo_model_path())  # the embedded demo: other layer widths than the tiny model
    args = {
        "fuse": ["--output", str(tmp_path / "fused")],
        "eval": ["--limit", "1"],
        "generate": ["--prompt", "hi"],
    }[command]
    line = refused(capsys, lambda: main([command, "--model", other, "--adapter-path", str(trained_run), *args]))
    assert "do not fit" in line and "lora_a" in line and "trained on" in line
    assert not (tmp_path / "fused").exists()
