"""The Python executor behind `--tools python`: a model's program run in a separate, limited process.

Every call gets a fresh process and a fresh working folder, removed afterwards. What can
go wrong (an endless loop, a fork bomb, endless allocation, megabytes of output, a look at
the user's files, an attempt to get out) ends as an error text the model sees, within the
wall-clock timeout; no process of the call outlives it.

What bounds a program, in layers:

1. The OS layer, the boundary, on by default (`sandbox="os"`):
   - Linux: bubblewrap (`bwrap`). The program gets its own mount namespace whose root
     holds only what the interpreter needs, read-only (/usr, Python's install prefix, the
     virtual environment, this package's launcher), its working folder (a tmpfs of
     `folder_bytes`, so the kernel bounds what it writes), a fresh /proc of its own PID
     namespace, four devices (null, zero, random, urandom) and nothing else: no home, no
     /tmp, no other project, no other process. No network (an empty network namespace),
     no IPC or UTS shared, a new session (no terminal injection), killed with its parent.
     As root it runs as a uid of its own (no such user; one per call, drawn from
     SANDBOX_UIDS), so RLIMIT_NPROC holds (the kernel exempts root) and counts this
     call's processes alone, not those of calls running beside it.
     Why bubblewrap: it is the small sandboxing tool Flatpak is built on, well kept and
     packaged everywhere (`apt-get install bubblewrap`); it builds the file system view
     (binds, a fresh /proc, a sized tmpfs) and the mount, PID, network and user namespaces
     in one call, without root, which `unshare` alone does not (it shares the file system).
   - macOS: `sandbox-exec` with a profile (`macos_profile`) that denies the network,
     writes outside the working folder, reading the user's home (but for the interpreter
     and the launcher where they live there), forking, executing anything but Python,
     and looking at or signalling other processes.
   Where no OS layer works, `run_python` refuses to run (one line saying why) unless the
   caller opted in to the guard alone: `sandbox="guard-only"` (`--tool-sandbox guard-only`).
2. The guard (sandbox_child.py, a Python audit hook), the second line: no reading outside
   the working folder and Python's library folders, no writing outside the working
   folder, no processes, no signals to other processes, no sockets, no ctypes calls, no
   native modules from outside Python's library folders, no tampering with itself.
3. Resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (memory; Linux only, macOS does
   not enforce it), RLIMIT_FSIZE (largest file, the captured output included),
   RLIMIT_NPROC (processes; on Linux, as root too under the OS layer; guard-only as root
   the parent counts the call's processes instead). The working folder's total bytes:
   the tmpfs size under bubblewrap, else the parent measures it as the program runs.
4. The parent: `start_new_session=True`, and at the end, at the timeout or at a limit,
   SIGKILL to the whole process group; on Linux also, until none is left, to any live
   process of the group or carrying the call's marker in its environment (a child that
   called setsid() to leave the group). Under bubblewrap the PID namespace ends with
   its first process, taking every process of the call with it.
5. A scrubbed environment (HOME and TMPDIR point at the working folder, no PYTHONPATH,
   no tokens in variables), `python -I`, and the working folder as cwd.

What it does not promise: guard-only, a hostile program may find a way around an audit
hook (an interpreter bug, a standard-library C function it does not know) and then reads
and writes what the user can. Under bubblewrap, a kernel bug is the way out; under
sandbox-exec, what the profile allows (reading the system outside the home folder).
Run untrusted models' code in a VM if that matters to you.
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

from .sandbox_os import CHILD, DEVICES, interpreter_folders, linux_command, macos_profile  # noqa: F401 (named here before)

MARKER = "GRPO_MLX_SANDBOX_RUN"  # environment variable naming the call, for finding its processes
SANDBOX_MODES = ("os", "guard-only")  # --tool-sandbox: the OS layer (required), or the guard alone (an opt-in)
# The uids a program runs as under bubblewrap when the trainer runs as root: one per call, so that
# RLIMIT_NPROC, which counts a uid's processes system-wide, counts this call's alone. No user has them.
SANDBOX_UIDS = range(1_900_000_000, 2_000_000_000)
POLL_SECONDS = 0.05  # how often the parent checks the timeout and, guard-only, the folder and process count
GUARD_ONLY_HINT = "--tool-sandbox guard-only"


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on one program."""

    timeout: float = 10.0  # wall-clock seconds, then the whole process group is killed
    cpu_seconds: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS; Linux only
    output_chars: int = 2000  # what the model sees of stdout and stderr: the head and the tail
    file_bytes: int = 8 << 20  # RLIMIT_FSIZE: any file the program writes, its captured output included
    processes: int = 32  # RLIMIT_NPROC: processes and threads beyond what the user runs already
    folder_bytes: int = 64 << 20  # everything in the working folder together


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

    `isolate=True` requires the OS layer: where it is missing the result is an error saying
    why (`os_layer_problem`), nothing runs. `isolate=False` is the guard-only mode, and
    `guard=False` leaves out the audit hook (tests use both to check each layer alone).
    """
    start = time.perf_counter()
    run_id = uuid.uuid4().hex
    if isolate and (problem := os_layer_problem()):
        return SandboxResult(f"Error: the python tool has no OS sandbox here: {problem}", True, False,
                             time.perf_counter() - start, None, run_id)
    root = Path(tempfile.mkdtemp(prefix="grpo-mlx-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        program = root / "program.py"
        program.write_text(code, encoding="utf-8", errors="replace")
        os.chmod(program, 0o644)
        layer = os_layer() if isolate else None
        uid = _call_uid(run_id) if layer == "bwrap" and os.geteuid() == 0 else None
        config, python = _child_command(program, work, guard, limits, uid)
        if layer == "bwrap":
            command = linux_command(python, work, program, limits.folder_bytes, as_root=os.geteuid() == 0)
        elif layer == "sandbox-exec":
            command = ["sandbox-exec", "-p", macos_profile(work.resolve(), [program.resolve(), CHILD.resolve()]), *python]
        else:
            command = python
        # Guard-only, the parent measures what the kernel does not bound: the folder, and processes as root.
        watch_folder = layer != "bwrap"
        count_processes = layer is None and sys.platform.startswith("linux") and config["processes"] is None
        output_path = root / "output"
        with open(output_path, "wb") as output:
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                           cwd=work, env=_child_environment(work, run_id), start_new_session=True)
            except OSError as exc:
                return SandboxResult(f"Error: could not start Python ({exc})", True, False,
                                     time.perf_counter() - start, None, run_id)
            timed_out, exceeded = False, None
            deadline = time.monotonic() + limits.timeout
            try:
                while True:
                    try:
                        process.wait(timeout=max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                    if watch_folder and _folder_bytes(work, limits.folder_bytes) > limits.folder_bytes:
                        exceeded = f"wrote more than {limits.folder_bytes} bytes to its folder"
                        break
                    if count_processes and len(_live_processes(process.pid, run_id)) > limits.processes:
                        exceeded = f"started more than {limits.processes} processes"
                        break
            finally:
                _kill_all(process, run_id)
        text, error = _outcome(output_path, process.returncode, timed_out, limits, exceeded)
        return SandboxResult(text, error, timed_out, time.perf_counter() - start, process.pid, run_id)
    finally:
        _remove_folder(root)


def _call_uid(run_id: str) -> int:
    """The uid of a call's program when the trainer runs as root (SANDBOX_UIDS)."""
    return SANDBOX_UIDS[int(run_id[:12], 16) % len(SANDBOX_UIDS)]


def _child_command(program: Path, work: Path, guard: bool, limits: SandboxLimits,
                   uid: int | None) -> tuple[dict, list[str]]:
    """The child's configuration and the words that start it (sandbox_child.py); `uid`: the user it
    becomes (root under bubblewrap), else None."""
    config = {"program": str(program), "workdir": str(work), "guard": guard,
              "cpu_seconds": max(1, int(limits.cpu_seconds)), "memory_bytes": limits.memory_bytes,
              "file_bytes": limits.file_bytes, "uid": uid,
              "processes": _process_limit(limits.processes, os.getuid() if uid is None else uid)}
    return config, [sys.executable, "-I", "-u", str(CHILD), json.dumps(config)]


@functools.cache
def os_layer() -> str | None:
    """The OS layer that works on this machine: "bwrap" (Linux), "sandbox-exec" (macOS) or None. Probed once."""
    return None if os_layer_problem() else ("bwrap" if sys.platform.startswith("linux") else "sandbox-exec")


@functools.cache
def os_layer_problem() -> str | None:
    """None where the OS layer works here; else why not, in one line that names the way out. Probed once
    (a real program through the full command, so a system that forbids namespaces is found here)."""
    way_out = f"run with {GUARD_ONLY_HINT} to rely on the in-process guard alone (not a security boundary)"
    if sys.platform.startswith("linux"):
        if not shutil.which("bwrap"):
            return f"bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) or {way_out}"
        with tempfile.TemporaryDirectory(prefix="grpo-mlx-sandbox-probe-") as folder:
            work, program = Path(folder) / "work", Path(folder) / "probe.py"
            work.mkdir()
            program.write_text("import os, sys\nos.getcwd()")
            os.chmod(program, 0o644)
            as_root = os.geteuid() == 0  # the real launch: the child, its limits, its own uid as root, the guard
            _, python = _child_command(program, work, True, SandboxLimits(), _call_uid("0" * 12) if as_root else None)
            reason = _probe(linux_command(python, work, program, 1 << 20, as_root=as_root), work)
        return reason and f"bwrap could not run Python in its namespaces here ({reason}); {way_out}"
    if sys.platform == "darwin":
        if not shutil.which("sandbox-exec"):
            return f"sandbox-exec is missing; {way_out}"
        with tempfile.TemporaryDirectory(prefix="grpo-mlx-sandbox-probe-") as folder:
            work = Path(folder).resolve()
            reason = _probe(["sandbox-exec", "-p", macos_profile(work, []), sys.executable, "-I", "-c", "pass"], work)
        return reason and f"sandbox-exec refused the profile ({reason}); {way_out}"
    return f"no OS sandbox is known for {sys.platform}; {way_out}"


def _probe(command: list[str], cwd: Path) -> str | None:
    """None where `command` runs and exits 0, else the last line it printed (or why it did not start).
    In the environment a real call gets: the user's (LD_PRELOAD of a threaded BLAS) once hung it here."""
    try:
        probe = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, cwd=cwd, timeout=30,
                               env=_child_environment(cwd, "probe"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if probe.returncode == 0:
        return None
    lines = (probe.stderr or probe.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


def _child_environment(work: Path, run_id: str) -> dict[str, str]:
    """Only what Python needs: nothing of the user's environment (tokens, PYTHONPATH, HOME) goes in."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            MARKER: run_id}


def _process_limit(headroom: int, uid: int) -> int | None:
    """RLIMIT_NPROC for a program running as `uid`: that user's tasks now plus `headroom`; None where it
    cannot be counted (not Linux) or does not apply (root, whom the kernel exempts)."""
    if uid == 0 or not sys.platform.startswith("linux"):
        return None
    tasks = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    tasks += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended meanwhile
                pass
    return tasks + headroom


def _folder_bytes(folder: Path, bound: int) -> int:
    """Bytes the files under `folder` take on disk, counting stops once past `bound` (or 10,000 entries,
    which count as past it: a program making a million empty files is stopped too)."""
    total, entries, stack = 0, 0, [str(folder)]
    while stack and total <= bound:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > 10_000:
                        return bound + 1
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        stat = entry.stat(follow_symlinks=False)
                        total += max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)
        except OSError:  # a folder removed meanwhile, or one the program made unreadable
            pass
    return total


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


def _outcome(output_path: Path, returncode: int, timed_out: bool, limits: SandboxLimits,
             exceeded: str | None = None) -> tuple[str, bool]:
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
    if exceeded:
        notes.append(f"Error: the program {exceeded} and was stopped")
    elif timed_out:
        notes.append(f"Error: the program ran longer than {limits.timeout:g} s and was stopped")
    elif returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        notes.append(f"Error: the program was killed by {name} (CPU time {limits.cpu_seconds} s, "
                     f"memory {limits.memory_bytes >> 20} MiB)")
    if size >= limits.file_bytes:
        notes.append(f"Error: the program printed more than {limits.file_bytes} bytes and was stopped")
    error = timed_out or bool(exceeded) or returncode != 0 or size >= limits.file_bytes
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
