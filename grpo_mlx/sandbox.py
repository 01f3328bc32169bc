"""The Python executor behind `--tools python`: a model's program run in a separate, limited process.

Every call gets a fresh process and a fresh temporary folder, removed afterwards. What
can go wrong (an endless loop, a fork bomb, endless allocation, megabytes of output, a
look at the user's files) ends as an error text the model sees, within the wall-clock
timeout; no process of the call outlives it.

What bounds a program, in layers (each catches what the one before may miss):

1. The guard (sandbox_child.py, a Python audit hook): no reading outside the working
   folder and Python's library folders, no writing outside the working folder, no
   subprocesses, no signals to other processes, no sockets, no ctypes.
2. Resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (memory; Linux only, macOS does
   not enforce it), RLIMIT_FSIZE (largest file, the captured output included),
   RLIMIT_NPROC (processes; not for root, which the kernel exempts, and Linux only).
3. Isolation where the system permits it. Linux: `unshare` puts the program in a new
   network namespace (no network at all) and a new PID namespace (when its first
   process dies, the kernel kills every process inside), as root or through a user
   namespace. macOS: `sandbox-exec` with a profile that denies the network.
4. The parent: `start_new_session=True`, and at the end, or at the timeout, SIGKILL to
   the whole process group; on Linux also, until none is left, to any live process of
   the group or carrying the call's marker in its environment (a child that called
   setsid() to leave the group), so nothing of the call runs once run_python returns.
5. A scrubbed environment (HOME and TMPDIR point at the working folder, no
   PYTHONPATH, no tokens in variables), `python -I`, and the working folder as cwd.

Not a security boundary: a program written to escape (a C extension, a bug in the
interpreter, /proc tricks where no namespace is available) can read what the user can
read. Run untrusted models' code in a VM or container if that matters to you.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
MARKER = "GRPO_MLX_SANDBOX_RUN"  # environment variable naming the call, for finding its processes
MACOS_PROFILE = "(version 1)(allow default)(deny network*)"
LINUX_ISOLATION = (
    ("unshare", "--net", "--pid", "--fork", "--kill-child"),  # root
    ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"),  # user namespaces
)


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on one program."""

    timeout: float = 10.0  # wall-clock seconds, then the whole process group is killed
    cpu_seconds: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS; Linux only
    output_chars: int = 2000  # what the model sees of stdout and stderr: the head and the tail
    file_bytes: int = 8 << 20  # RLIMIT_FSIZE: any file the program writes, its captured output included
    processes: int = 32  # RLIMIT_NPROC: processes and threads beyond what the user runs already


@dataclass(frozen=True)
class SandboxResult:
    """How a program ended: the text the model sees, whether it failed, and where it ran."""

    text: str
    error: bool
    timed_out: bool
    seconds: float
    process_group: int | None  # the program's process group (gone once run_python returns)
    run_id: str  # the value of MARKER in the program's environment


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), guard: bool = True,
               isolate: bool = True) -> SandboxResult:
    """Run `code` in a fresh process and folder; never raises for anything the program does.

    `guard=False` leaves out the audit hook and `isolate=False` the namespaces or
    sandbox-exec (tests use both to check the layers beneath).
    """
    start = time.perf_counter()
    run_id = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="grpo-mlx-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        program = root / "program.py"
        program.write_text(code, encoding="utf-8", errors="replace")
        config = {"program": str(program), "workdir": str(work), "guard": guard,
                  "cpu_seconds": max(1, int(limits.cpu_seconds)), "memory_bytes": limits.memory_bytes,
                  "file_bytes": limits.file_bytes, "processes": _process_limit(limits.processes)}
        command = [*(isolation_command() if isolate else ()), sys.executable, "-I", "-u", str(CHILD),
                   json.dumps(config)]
        output_path = root / "output"
        with open(output_path, "wb") as output:
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                           cwd=work, env=_child_environment(work, run_id), start_new_session=True)
            except OSError as exc:
                return SandboxResult(f"Error: could not start Python ({exc})", True, False,
                                     time.perf_counter() - start, None, run_id)
            timed_out = False
            try:
                process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_all(process, run_id)
        text, error = _outcome(output_path, process.returncode, timed_out, limits)
        return SandboxResult(text, error, timed_out, time.perf_counter() - start, process.pid, run_id)
    finally:
        _remove_folder(root)


@functools.cache
def isolation_command() -> tuple[str, ...]:
    """The words that put a program in new network and PID namespaces (Linux) or deny it the
    network (macOS), whichever works on this machine; () where none does. Probed once."""
    if sys.platform.startswith("linux") and shutil.which("unshare"):
        candidates = LINUX_ISOLATION
    elif sys.platform == "darwin" and shutil.which("sandbox-exec"):
        candidates = (("sandbox-exec", "-p", MACOS_PROFILE),)
    else:
        return ()
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _child_environment(work: Path, run_id: str) -> dict[str, str]:
    """Only what Python needs: nothing of the user's environment (tokens, PYTHONPATH, HOME) goes in."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            MARKER: run_id}


def _process_limit(headroom: int) -> int | None:
    """RLIMIT_NPROC for the program: the user's tasks now plus `headroom`; None where it cannot
    be counted (not Linux) or does not apply (root)."""
    if os.geteuid() == 0 or not sys.platform.startswith("linux"):
        return None
    uid, tasks = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended meanwhile
                pass
    return tasks + headroom


def _kill_all(process: subprocess.Popen, run_id: str, patience: float = 2.0) -> None:
    """SIGKILL the program's process group and reap its first process; on Linux also kill, until none
    is left (at most `patience` seconds), every live process of the group or carrying the call's marker."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.returncode is None:
        process.wait()
    if not sys.platform.startswith("linux"):
        return  # elsewhere no /proc: SIGKILL to the group is all there is
    deadline = time.monotonic() + patience
    while (alive := _live_processes(process.pid, run_id)) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _live_processes(group: int, run_id: str) -> list[int]:
    """Linux: processes in process group `group` or with MARKER=run_id in their environment that are not
    yet dead. Zombies do not count: they run nothing and vanish when reaped, which some init
    processes do only every second or so."""
    marker = f"{MARKER}={run_id}".encode() + b"\0"
    alive = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state, _, process_group = f.read().rpartition(b")")[2].split()[:3]
            if state in (b"Z", b"X"):
                continue
            if int(process_group) == group:
                alive.append(int(entry.name))
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:  # a child that left the group with setsid()
                if marker in f.read():
                    alive.append(int(entry.name))
        except (OSError, ValueError):  # another user's process, or one that ended meanwhile
            pass
    return alive


def _outcome(output_path: Path, returncode: int, timed_out: bool, limits: SandboxLimits) -> tuple[str, bool]:
    """The text the model sees and whether the call failed."""
    size = output_path.stat().st_size
    half = max(limits.output_chars // 2, 1)
    with open(output_path, "rb") as f:
        if size <= 2 * half:
            text = f.read().decode("utf-8", errors="replace")
        else:  # the head shows what the program printed first, the tail how it ended
            head = f.read(half).decode("utf-8", errors="replace")
            f.seek(size - half)
            tail = f.read().decode("utf-8", errors="replace")
            text = f"{head}\n[... {size - 2 * half} bytes cut ...]\n{tail}"
    notes = []
    if timed_out:
        notes.append(f"Error: the program ran longer than {limits.timeout:g} s and was stopped")
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        notes.append(f"Error: the program was killed by {name} (CPU time {limits.cpu_seconds} s, "
                     f"memory {limits.memory_bytes >> 20} MiB)")
    if size >= limits.file_bytes:
        notes.append(f"Error: the program printed more than {limits.file_bytes} bytes and was stopped")
    error = timed_out or returncode != 0 or size >= limits.file_bytes
    text = "\n".join([text.rstrip("\n")] + notes if text.strip() else notes)
    return (text or "(no output)"), error


def _remove_folder(root: Path) -> None:
    """Remove the call's temporary folder, even where the program took away its permissions."""
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        for folder, _, _ in os.walk(root):
            if not os.path.islink(folder):
                os.chmod(folder, 0o700)
        shutil.rmtree(root, ignore_errors=True)
