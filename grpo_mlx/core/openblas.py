"""Linux: run MLX's CPU backend on OpenBLAS when the system has it.

MLX's Linux CPU wheel links a reference BLAS; with Debian's OpenBLAS preloaded its
float32 matmuls run many times faster (a demo step: ~1.0 s -> ~0.3 s on 2 cores).
A library can only be preloaded before the process starts, so `grpo-mlx` re-executes
itself once with LD_PRELOAD set. One OpenBLAS thread is the default: on 2 cores,
decoding was faster with 1 and a whole step took the same time (scripts/bench.py).
Set GRPO_MLX_NO_OPENBLAS=1 (or true, yes) to keep the process as it is; 0, false, no or empty keep the
preload. On macOS none of this applies.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3")


def openblas_loaded() -> bool:
    maps = Path("/proc/self/maps")
    return maps.exists() and "openblas" in maps.read_text()


def opted_out() -> bool:
    """GRPO_MLX_NO_OPENBLAS is 1, true or yes (any case): GRPO_MLX_NO_OPENBLAS=0 must not turn the preload off."""
    return os.environ.get("GRPO_MLX_NO_OPENBLAS", "").strip().lower() in ("1", "true", "yes")


def reexec_with_openblas(argv: list[str] | None = None) -> None:
    """Replace this process by the same command with OpenBLAS preloaded, where that helps.

    Does nothing off Linux, without the library, when it is loaded already, after one
    try (the marker variable), or when GRPO_MLX_NO_OPENBLAS says so (`opted_out`).
    """
    if sys.platform != "linux" or not OPENBLAS.exists() or openblas_loaded():
        return
    if opted_out() or os.environ.get("GRPO_MLX_OPENBLAS_TRIED"):
        return
    preload = " ".join(filter(None, [str(OPENBLAS), os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, "GRPO_MLX_OPENBLAS_TRIED": "1"}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv or sys.orig_argv, env)
