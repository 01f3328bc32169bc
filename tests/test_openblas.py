"""On Linux `grpo-mlx` re-executes itself with OpenBLAS preloaded when the system has it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_mlx.core.openblas import OPENBLAS

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not OPENBLAS.exists(), reason="needs Linux with OpenBLAS")

PROBE = ("import os; from grpo_mlx.core.openblas import openblas_loaded, reexec_with_openblas; reexec_with_openblas(); "
         "print(openblas_loaded(), os.environ.get('OPENBLAS_NUM_THREADS'))")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "GRPO_MLX_OPENBLAS_TRIED", "GRPO_MLX_NO_OPENBLAS")}
    return {**env, **extra}


def test_process_without_openblas_reexecutes_with_it_and_one_thread():
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1"]


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_opting_out_keeps_the_process_as_it_is(value):
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(GRPO_MLX_NO_OPENBLAS=value),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "None"]


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_a_value_that_says_no_keeps_the_preload(value):
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean_env(GRPO_MLX_NO_OPENBLAS=value),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1"]


def test_console_script_runs_after_the_reexec():
    script = Path(sys.executable).with_name("grpo-mlx")
    if not script.exists():
        pytest.skip("grpo-mlx console script not installed beside this python")
    out = subprocess.run([str(script), "rewards"], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and "format" in out.stdout
