"""Shared fixtures: tiny models built here, never downloaded."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Every process a test starts (`python -m grpo_mlx.cli`, mlx.launch's ranks, scripts/) imports this checkout's
# grpo_mlx, not another one an editable install points at.
REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random float32 Qwen2-shaped model with a byte-level BPE tokenizer and a chat template."""
    from grpo_mlx.model.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


TRAINED_RUN_ARGS = ["--steps", "2", "--batch-size", "2", "--group-size", "4", "--max-tokens", "6",
                    "--learning-rate", "0.05", "--seed", "1"]


@pytest.fixture(scope="session")
def trained_run_dir(tiny_model_dir, tmp_path_factory):
    """A run directory trained once by `grpo-mlx train` (2 steps), shared by the fuse, generate
    and GGUF tests. Read it, never write into it: copy it first."""
    from pathlib import Path

    from click.testing import CliRunner

    from grpo_mlx.cli import cli

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    reward = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--reward", reward, *TRAINED_RUN_ARGS]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return run_dir
