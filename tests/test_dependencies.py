"""The mlx-lm range: declared in pyproject.toml, checked at run time in one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_mlx.core.errors import UserError
from grpo_mlx.rollout.batch import MLX_LM_REQUIREMENT, check_mlx_lm

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def test_pyproject_declares_the_range_the_rollout_checks():
    assert re.findall(r'"(mlx-lm[^";]*)"', PYPROJECT) == [MLX_LM_REQUIREMENT]
    # .ci/run installs these floors: both platforms' mlx lines must name one.
    assert len(set(re.findall(r'"mlx(?:\[cpu\])?>=([0-9.]+);', PYPROJECT))) == 1


@pytest.mark.parametrize("version", ["0.29.1", "0.30.7", "0.31.2", "0.33.0", "1.0"])
def test_an_mlx_lm_outside_the_range_is_refused_naming_it(version):
    with pytest.raises(UserError, match=re.escape(f"mlx-lm {version} is not supported")) as e:
        check_mlx_lm(version)
    assert MLX_LM_REQUIREMENT in str(e.value)


def test_the_installed_mlx_lm_and_the_floor_pass():
    check_mlx_lm()
    check_mlx_lm("0.31.3")


def test_an_mlx_lm_without_the_batch_api_is_refused(monkeypatch):
    from mlx_lm.generate import BatchGenerator

    monkeypatch.delattr(BatchGenerator, "next_generated")  # what mlx-lm 0.30 lacks
    with pytest.raises(UserError, match=re.escape(MLX_LM_REQUIREMENT)):
        check_mlx_lm("0.32.0")


def test_train_with_an_old_mlx_lm_is_one_line_before_anything_is_written(tmp_path):
    # A fresh process whose metadata reports mlx-lm 0.30.7, as an old install would.
    code = (
        "import importlib.metadata as m, sys; real = m.version\n"
        "m.version = lambda name: '0.30.7' if name == 'mlx-lm' else real(name)\n"
        "from grpo_mlx.cli import main; main(sys.argv[1:])\n"
    )
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", code, "train", "--steps", "1", "--output", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert err == [f"error: mlx-lm 0.30.7 is not supported: grpo-mlx's rollouts need {MLX_LM_REQUIREMENT}; "
                   f"install it with: pip install '{MLX_LM_REQUIREMENT}'"]
    assert not run_dir.exists()
