"""The OS layer of the sandbox (see `sandbox`): the bubblewrap command on Linux and the `sandbox-exec`
profile on macOS, each built from the folders the interpreter needs, read-only."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")  # the guard, run by its path
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


@functools.cache
def interpreter_folders() -> list[str]:
    """What the child's Python needs to read besides /usr: its install prefixes, the virtual environment
    and its library folders, each as named and as resolved (symlinks), without repeats or what /usr covers."""
    paths = sysconfig.get_paths()
    named = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
             *(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths),
             *_library_folders()]
    folders = []
    for path in [*named, *(os.path.realpath(p) for p in named)]:
        path = os.path.normpath(path)
        if path in ("/", "/usr") or path.startswith("/usr/") or not os.path.isdir(path):
            continue
        if not any(path == f or path.startswith(f + os.sep) for f in folders):
            folders = [f for f in folders if not f.startswith(path + os.sep)] + [path]
    return folders


def _library_folders() -> list[str]:
    """Linux: the folders of the shared libraries this process has loaded (Python's own and its
    dependencies'), for systems that keep them outside /usr (Nix, Guix, custom builds); not the
    temporary folder, where nothing the interpreter needs belongs."""
    folders = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5].rpartition("/")[2]:
                    folders.add(os.path.dirname(parts[5].strip()))
    except OSError:  # not Linux
        return []
    temporary = os.path.realpath(tempfile.gettempdir())
    return sorted(f for f in folders if not f.startswith(("/proc", "/dev", temporary + os.sep)))


def linux_command(python: list[str], work: Path, program: Path, folder_bytes: int, as_root: bool,
                  folders: list[str] | None = None) -> list[str]:
    """The bubblewrap command line that runs `python` (its words) in the program's own world (see the
    module's docstring): a pure function of its arguments, tested as such."""
    command = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session",
               "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if as_root:  # no user namespace (root's would map to root, whom RLIMIT_NPROC exempts): the child drops to its uid
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user"]
    command += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib32", "lib64", "sbin"):  # merged-/usr systems link these into /usr
        path = Path("/" + name)
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    folders = list(interpreter_folders()) if folders is None else folders
    # The folders above each mount point, made traversable (bwrap would make them 0700: a dead end to the program's uid).
    above = {str(parent) for target in [*folders, CHILD, program, work] for parent in Path(target).parents}
    for parent in sorted(above - {"/"}, key=lambda p: (p.count("/"), p)):
        command += ["--perms", "0755", "--dir", parent]
    command += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
                "--ro-bind-try", "/etc/localtime", "/etc/localtime"]
    for folder in folders:
        command += ["--ro-bind", folder, folder]
    command += ["--ro-bind", str(CHILD), str(CHILD), "--ro-bind", str(program), str(program)]
    for device in DEVICES:
        command += ["--dev-bind", device, device]
    command += ["--proc", "/proc",
                "--perms", "0777", "--size", str(int(folder_bytes)), "--tmpfs", str(work),
                "--remount-ro", "/", "--chdir", str(work), *python]
    return command


def macos_profile(work: Path, readable_files: list[Path], home: Path | None = None,
                  folders: list[str] | None = None, python: list[str] | None = None) -> str:
    """The sandbox-exec profile (SBPL) for a program working in `work`: no network; no writes outside
    `work` (and /dev/null); nothing read in the user's home but the interpreter's folders and
    `readable_files` (the launcher, the program) where they live there; no fork, no exec but Python;
    no looking at or signalling other processes. A pure function of its arguments, tested as such."""
    home = Path.home() if home is None else home
    folders = list(interpreter_folders()) if folders is None else folders
    python = list(dict.fromkeys([sys.executable, os.path.realpath(sys.executable)])) if python is None else python

    def quote(path) -> str:
        return json.dumps(str(path))  # SBPL strings take the same escapes as JSON's

    home_exceptions = " ".join([f"(subpath {quote(work)})", *(f"(subpath {quote(f)})" for f in folders),
                                *(f"(literal {quote(f)})" for f in readable_files)])
    return "\n".join([
        "(version 1)",
        "(allow default)",
        "(deny network*)",
        f"(deny file-write* (require-not (require-any (subpath {quote(work)}) (literal \"/dev/null\"))))",
        f"(deny file-read* (require-all (subpath {quote(home)}) (require-not (require-any {home_exceptions}))))",
        "(deny process-fork)",
        f"(deny process-exec* (require-not (require-any {' '.join(f'(literal {quote(p)})' for p in python)})))",
        "(deny process-info* (target others))",
        "(deny signal (target others))",
    ])
