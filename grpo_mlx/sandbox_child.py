"""The child side of the Python sandbox: set the limits, install the guard, run the program.

sandbox.py runs this file by its path, `python -I -u sandbox_child.py CONFIG_JSON`, never
as `grpo_mlx.sandbox_child`: -I (isolated mode) ignores PYTHONPATH and the user's
site-packages, so the package itself may not be importable here. Standard library only.

The guard is an audit hook (PEP 578) that refuses, with PermissionError, what a model's
arithmetic has no business doing: opening or listing files outside the working directory
and Python's own library folders, writing outside the working directory, starting
processes, signalling other processes, sockets and ctypes. It stops honest mistakes and
a careless program, not a hostile one: C extensions and interpreter tricks get around
audit hooks. The limits and the parent's kill are what bound a program that does.
"""

import json
import linecache
import os
import resource
import sys
import sysconfig
import traceback

# Always refused: process creation and signals (fork bombs, killing the user's processes),
# the network, and ctypes (a way around everything else).
FORBIDDEN_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.killpg", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "socket.gethostbyname", "ctypes.dlsym", "ctypes.dlsym/handle",
    "webbrowser.open",
}
# Events whose path arguments (the first `count`) must lie inside the readable folders.
READ_EVENTS = {"os.listdir": 1, "os.scandir": 1, "glob.glob": 1}
# Events whose path arguments must lie inside the working directory.
WRITE_EVENTS = {
    "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
    "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1,
    "os.setxattr": 1, "os.removexattr": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2,
    "shutil.move": 2, "shutil.chown": 1,
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], encoding="utf-8") as f:
        code = f.read()
    workdir = os.path.realpath(config["workdir"])
    set_limits(config)
    os.chdir(workdir)
    sys.path.insert(0, workdir)  # the program may import modules it wrote, as a script beside them would
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    # Tracebacks show the program's lines: linecache cannot read "<program>" from disk.
    linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
    try:
        compiled = compile(code, "<program>", "exec")
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        traceback.print_exc(limit=0)
        sys.exit(1)
    if config["guard"]:
        sys.addaudithook(guard(workdir))
    try:
        exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the program's error is its output
        # The program's frames only: this file's (main, the guard) would only confuse the model.
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != __file__])
        sys.stderr.write("".join(report.format()))
        sys.exit(1)


def set_limits(config: dict) -> None:
    """CPU seconds, address space, file size, processes; a limit the system refuses is skipped.

    macOS accepts RLIMIT_AS but does not enforce it, and refuses some values outright.
    """
    limits = [("RLIMIT_CPU", config["cpu_seconds"], config["cpu_seconds"] + 1),
              ("RLIMIT_AS", config["memory_bytes"], config["memory_bytes"]),
              ("RLIMIT_FSIZE", config["file_bytes"], config["file_bytes"]),
              ("RLIMIT_CORE", 0, 0)]
    if config["processes"] is not None:
        limits.append(("RLIMIT_NPROC", config["processes"], config["processes"]))
    for name, soft, hard in limits:
        which = getattr(resource, name, None)
        if which is None:
            continue
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass


def guard(workdir: str):
    """The audit hook: reads inside `workdir`, Python's library folders and a few devices; writes inside `workdir`."""
    paths = sysconfig.get_paths()
    library = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    readable = [workdir, *(os.path.realpath(p) for p in library), *DEVICES]
    writable = [workdir, "/dev/null"]
    pid = os.getpid()

    def inside(path, roots) -> bool:
        if isinstance(path, int):  # an open file descriptor: it was allowed when opened
            return True
        full = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
        return any(full == root or full.startswith(root.rstrip(os.sep) + os.sep) for root in roots)

    def hook(event: str, args: tuple) -> None:
        if event in FORBIDDEN_EVENTS:
            raise PermissionError(f"the sandbox does not allow {event}")
        if event == "os.kill" and args[0] != pid:
            raise PermissionError("the sandbox does not allow signalling other processes")
        if event == "ctypes.dlopen" and args[0] is not None:
            raise PermissionError("the sandbox does not allow loading libraries with ctypes")
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if not inside(path, writable if writes else readable):
                raise PermissionError(f"the sandbox does not allow {'writing' if writes else 'reading'} {path!r}: "
                                      "work in the current directory")
            # A folder's descriptor outside the working directory would be a dir_fd for os.open, os.remove
            # and the rest, which resolve relative paths against it, around the checks here (relative to cwd).
            if not writes and not inside(path, writable) and os.path.isdir(path):
                raise PermissionError(f"the sandbox does not allow opening the folder {path!r}: "
                                      "work in the current directory")
        elif event in READ_EVENTS:
            for path in args[:READ_EVENTS[event]]:
                if path is not None and not inside(path, readable):
                    raise PermissionError(f"the sandbox does not allow listing {path!r}")
        elif event in WRITE_EVENTS:
            for path in args[:WRITE_EVENTS[event]]:
                if path is not None and not inside(path, writable):
                    raise PermissionError(f"the sandbox does not allow changing {path!r}: work in the current directory")

    return hook


if __name__ == "__main__":
    main()
