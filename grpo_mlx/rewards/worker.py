"""The reward worker process: a fresh Python that runs timed reward calls, so one running past its time
limit can be cut off (see `RewardWorker`); and `run_reward_call`, one checked call, run here or there."""

from __future__ import annotations

import atexit
import importlib
import math
import numbers
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from ..core.plugins import exception_text
from .registry import _REGISTRY, RewardError, RewardFn, _load_plugin

BUILTINS_MODULE = "grpo_mlx.rewards.builtins"  # registered there, found by every worker that imports the package


class RewardTimeout(Exception):
    """One reward call ran past its time limit (its rows are then scored alone)."""


def run_reward_call(fn: RewardFn, label: str, n: int, args: tuple, kwargs: dict) -> tuple[str, object]:
    """Call `fn`: ("ok", values), ("bad", message) for a malformed result, or ("raised", what it raised)."""
    try:
        values = fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: argparse or click in a scoring helper call sys.exit()
        return "raised", exception_text(exc)
    try:
        return "ok", _check_values(values, n, label)
    except RewardError as exc:
        return "bad", str(exc)



def _check_values(values, n: int, label: str) -> list[float | None]:
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{label} returned {type(values).__name__}; return a list of {n} floats (None where it does not apply)")
    if len(values) != n:
        raise RewardError(f"{label} returned {len(values)} values for {n} completions; return one per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(v):
            out.append(float(v))
        else:
            raise RewardError(f"{label} returned {v!r} for completion {i}; return finite floats or None")
    return out


# ---------------------------------------------------------------- the worker process


ORPHAN_CHECK_SECONDS = 1.0  # how often a worker checks that its trainer is still alive


class RewardWorker:
    """A Python process that runs reward calls, so that one running past its time limit can be cut off.

    Started on the first call; a fresh interpreter (not a fork of the trainer, whose MLX threads a fork
    would copy) that loads each reward by its name and keeps it, so a plug-in's import runs once per
    worker. A call that times out, is interrupted or finds the worker dead has the worker and all it
    started killed and reaped (`stop`); the next call starts a new one. A worker whose trainer is gone
    exits by itself.
    """

    def __init__(self):
        self.process = None
        self.requests = self.replies = None

    def call(self, request: tuple, timeout: float) -> tuple[str, object]:
        """Send `request` (name, module, label, n, args, kwargs); the reply, or RewardTimeout."""
        label = request[2]
        try:
            message = pickle.dumps(request)
        except Exception as exc:  # a data set column pickle cannot carry
            return "bad", f"{label}: its arguments cannot be sent to the reward worker process ({exception_text(exc)})"
        if self.process is not None and self.process.poll() is not None:  # died between calls (OOM killer, kill)
            self.stop()
        if self.process is None:
            self._start()
        try:
            self.requests.send_bytes(message)
            if not self.replies.poll(timeout):
                raise RewardTimeout(f"{label} ran past {timeout:g} s")
            return self.replies.recv()
        except (EOFError, OSError):  # the worker died: os._exit(), a signal, a crash
            return "raised", f"its worker process died ({_exit_text(self.stop())})"
        except BaseException:  # timed out or interrupted: the worker may be mid-call, so it goes
            self.stop()
            raise

    def _start(self) -> None:
        to_worker, from_trainer = os.pipe()
        to_trainer, from_worker = os.pipe()
        code = (f"import sys; sys.path[:] = {sys.path!r}; from grpo_mlx.rewards.worker import serve_reward_calls; "
                f"serve_reward_calls({to_worker}, {from_worker})")
        try:
            # A session of its own: Ctrl-C reaches the trainer only, and stop() kills the whole group.
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_worker, from_worker),
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(from_trainer)
            os.close(to_trainer)
            raise
        finally:
            os.close(to_worker)
            os.close(from_worker)
        self.requests = Connection(from_trainer, readable=False)
        self.replies = Connection(to_trainer, writable=False)

    def stop(self) -> int | None:
        """Kill the worker and everything it started, reap it (no zombie); its exit status."""
        if self.process is None:
            return None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # before reaping: the group id is still ours
        except (ProcessLookupError, PermissionError):
            pass
        code = self.process.wait()
        self.requests.close()
        self.replies.close()
        self.process = self.requests = self.replies = None
        return code


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _registering_module(name: str, fn: RewardFn) -> str | None:
    """The module a worker imports to find `name` in the registry, for rewards registered outside this one."""
    if name not in _REGISTRY or fn.__module__ == BUILTINS_MODULE:
        return None
    if fn.__module__ == "__main__":
        raise RewardError(f"reward {name!r} is registered in __main__, which its worker process cannot import: "
                          "put it in a module or a file and name it as module:function or file.py:function")
    return fn.__module__


def serve_reward_calls(read_fd: int, write_fd: int) -> None:
    """The worker process's loop (see `RewardWorker`): load each reward by name once, answer each call."""
    requests = Connection(read_fd, writable=False)
    replies = Connection(write_fd, readable=False)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    functions = {}
    while True:
        try:
            name, module, label, n, args, kwargs = requests.recv()
        except EOFError:  # the trainer closed its end
            return
        try:
            if name not in functions:
                if module is not None:
                    importlib.import_module(module)
                functions[name] = _REGISTRY[name] if name in _REGISTRY else _load_plugin(name)
            reply = run_reward_call(functions[name], label, n, args, kwargs)
        except Exception as exc:  # loading it failed here, though it loaded in the trainer
            reply = ("bad", f"{label} cannot be loaded in its worker process: {exception_text(exc)}")
        replies.send(reply)


def _exit_when_orphaned(parent: int) -> None:
    while True:
        time.sleep(ORPHAN_CHECK_SECONDS)
        if os.getppid() != parent:
            os._exit(0)


_WORKER = RewardWorker()
atexit.register(_WORKER.stop)


def stop_reward_worker() -> None:
    """Kill and reap the reward worker process, if one runs (the next timed call starts a new one)."""
    _WORKER.stop()

