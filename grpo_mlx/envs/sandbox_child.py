"""The child side of the Python sandbox: set the limits, install the guard, run the program.

sandbox.py runs this file by its path, `python -I -u sandbox_child.py CONFIG_JSON`, never
as `grpo_mlx.sandbox_child`: -I (isolated mode) ignores PYTHONPATH and the user's
site-packages, so the package itself may not be importable here. Standard library only.

The guard is an audit hook (PEP 578) that refuses, with PermissionError, what a model's
arithmetic has no business doing: opening or listing files outside the working directory
and Python's own library folders, writing outside the working directory, changing
directory, symbolic links, starting processes (including the unaudited starters in
_posixsubprocess, _posixshmem and multiprocessing), signalling or limiting other
processes, sockets, ctypes calls and native modules from outside Python's library folders.

It is the second line, behind the OS layer (sandbox.py): an audit hook runs inside the
process it polices, so a hostile program that finds a way around it (a bug in the
interpreter, a C extension of the standard library the hook does not know) is held by
the namespaces alone. What the guard does to be hard to switch off from inside:

- the program runs in a fresh `__main__` module, not this one, and this module leaves
  sys.modules before the program starts: nothing of the guard is reachable by name;
- the hook keeps its state (the refused events, the folders, the C functions it calls)
  in its default arguments, bound before the program runs, immutable: patching builtins,
  os or os.path does not change what it checks, writing into a finished frame of the
  hook changes no later call, and the function itself cannot be reached, because gc's
  object walks, tracing and profiling, which lead to it, are refused, and so is
  replacing its defaults or any function's __code__;
- the program cannot change directory, so every relative path means what the hook
  resolved it to, and cannot open a folder, so no descriptor can serve as a dir_fd.
"""

import json
import linecache
import os
import resource
import sys
import sysconfig
import traceback
import types

# Always refused: process creation and signals (fork bombs, killing the user's processes),
# the network, tracing and gc walks (ways to reach the hook's state), ctypes calls, changing
# directory (relative paths keep the meaning the hook checked), symbolic links, raising limits
# (root could lift its own).
FORBIDDEN_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "os.killpg", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "socket.gethostbyname", "webbrowser.open",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
    "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at", "ctypes.set_errno", "ctypes.set_exception",
    "sqlite3.enable_load_extension", "sqlite3.load_extension",
    "os.chdir", "os.symlink", "os.chroot", "os.setxattr", "os.removexattr",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "sys._current_exceptions", "sys.monitoring.register_callback",
    "os.setns", "os.unshare", "resource.setrlimit",
})
# Modules refused outright (ModuleNotFoundError, so `try: import x except ImportError` falls back):
# unaudited process starters, shared memory, test hooks into the interpreter, and modules that open
# files from C, unseen by the hook (readline's history, sqlite3's ATTACH and VACUUM INTO, dbm, curses,
# ssl's certificate files, spwd's shadow file). _posixsubprocess, posix, pwd and grp are imported
# (disarmed) before the hook goes in; refusing them here refuses making them anew.
FORBIDDEN_MODULES = frozenset({
    "_posixsubprocess", "_posixshmem", "multiprocessing", "_multiprocessing", "readline", "_ctypes_test",
    "_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels", "_lsprof", "posix", "pty",
    "sqlite3", "_sqlite3", "_dbm", "_gdbm", "_curses", "_curses_panel", "_ssl", "spwd", "pwd", "grp",
})
# Events whose path arguments (the first `count`) must lie inside the readable folders.
READ_EVENTS = {"os.listdir": 1, "os.scandir": 1, "glob.glob": 1}
# Events whose path arguments must lie inside the working directory.
WRITE_EVENTS = {
    "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2,
    "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1,
    "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2, "shutil.chown": 1,
    "sqlite3.connect": 1,
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["program"], encoding="utf-8") as f:
        code = f.read()
    workdir = os.path.realpath(config["workdir"])
    set_limits(config)
    if config.get("uid") is not None:  # root inside the OS layer: become the call's own uid, which RLIMIT_NPROC holds
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
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
    # The program's own __main__; this module leaves sys.modules (nothing of the guard by name).
    program = types.ModuleType("__main__")
    program.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = program
    if config["guard"]:
        disarm_unaudited_starters()
        sys.addaudithook(guard(workdir))
    sys.modules.pop("sandbox_child", None)
    run(compiled, program.__dict__, __file__)


def run(compiled, namespace: dict, own_file: str) -> None:
    try:
        exec(compiled, namespace)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the program's error is its output
        # The program's frames only: this file's (main, the guard) would only confuse the model.
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != own_file])
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


def disarm_unaudited_starters() -> None:
    """Replace the process and signal functions that raise no audit event with refusals, in every
    module that holds them, before the guard goes in (which then refuses importing those modules anew).

    _posixsubprocess.fork_exec starts a process without the subprocess.Popen event; pidfd_open and
    pidfd_send_signal signal any process of the user; mkfifo and mknod make files from C; setpriority
    and the sched_set* functions reach other processes. ctypes is imported here (numpy needs it, its
    import dlopen()s the interpreter) so that the guard can refuse every later dlopen and call.

    A built-in module made anew (`_imp.create_builtin`) would hand back the originals (the interpreter
    keeps a copy of a single-phase module's first dictionary), so every built-in module is imported
    now and `_imp.create_builtin` refuses from here on: nothing is left for it to do."""
    import _imp
    import _posixsubprocess  # noqa: F401 - subprocess imports it; it must hold the refusal
    import signal
    users = []
    for name in ("pwd", "grp"):  # the user database, read in C: shown empty, as under the OS layer
        try:
            users.append(__import__(name))
        except ImportError:
            pass
    for name in sys.builtin_module_names:
        if name not in FORBIDDEN_MODULES:
            try:
                __import__(name)
            except ImportError:
                pass
    try:
        import ctypes  # noqa: F401
    except ImportError:
        pass

    def refused(*args, **kwargs):
        raise PermissionError("the sandbox does not allow starting, signalling or steering processes this way")

    def no_new_builtin(*args, **kwargs):
        raise PermissionError("the sandbox does not allow making a built-in module anew")

    posix = sys.modules.get("posix") or sys.modules.get("nt")
    names = ("fork_exec", "pidfd_send_signal", "pidfd_open", "mkfifo", "mknod", "setpriority", "sched_setaffinity",
             "sched_setscheduler", "sched_setparam")
    for module in (_posixsubprocess, signal, sys.modules.get("_signal"), os, posix):
        for name in names:
            if module is not None and hasattr(module, name):
                setattr(module, name, refused)
    def unknown(*args, **kwargs):
        raise KeyError("the sandbox hides the user database")

    for module in users:
        for name in ("getpwall", "getgrall"):
            if hasattr(module, name):
                setattr(module, name, list)
        for name in ("getpwnam", "getpwuid", "getgrnam", "getgrgid"):
            if hasattr(module, name):
                setattr(module, name, unknown)
    _imp.create_builtin = no_new_builtin


def guard(workdir: str):
    """The audit hook: reads inside `workdir`, Python's library folders and a few devices; writes inside `workdir`.

    Its state and everything it calls are bound here, as default arguments (a tuple the hook's
    function keeps, not closure cells: from Python 3.13 a frame's f_locals writes through to its
    cells, and a refusal's traceback leads to the hook's frame), and are C functions, immutable
    containers and strings only: a program patching builtins, os or os.path, or writing into a
    finished hook frame, changes nothing the next call checks."""
    paths = sysconfig.get_paths()
    library = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    library_roots = tuple(os.path.realpath(p) for p in library)
    # C functions only: os.path's functions are Python, reading module globals (os.lstat, isinstance)
    # that a program could replace under them.
    posix = sys.modules.get("posix") or sys.modules["nt"]

    def resolve(path, lstat=posix.lstat, readlink=posix.readlink, getcwd=posix.getcwd, type_=type, str_=str,
                bytes_=bytes, int_=int, list_=list, reversed_=reversed, os_error=OSError, value_error=ValueError):
        """The absolute path `path` names, symbolic links followed (os.path.realpath, in C calls only);
        "" for a descriptor; None for a path type the guard will not interpret."""
        kind = type_(path)
        if kind is int_:  # an open file descriptor: it was allowed when opened (and no folder is)
            return ""
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:  # an object with __fspath__ could answer differently when used
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        pending, parts, links = list_(reversed_(path.split("/"))), [], 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [name])
            try:
                mode = lstat(candidate).st_mode
            except (os_error, value_error):  # not there (yet): the rest is read as written
                parts.append(name)
                continue
            if mode & 0o170000 == 0o120000:  # a symbolic link
                links += 1
                if links > 40:
                    return None
                target = readlink(candidate)
                if target.startswith("/"):
                    parts = []
                pending.extend(reversed_(target.split("/")))
                continue
            parts.append(name)
        return "/" + "/".join(parts)

    def inside(path, roots, resolve=resolve, any_=any, sep=os.sep) -> bool:
        full = resolve(path)
        if full == "":
            return True
        if full is None:
            return False
        return any_(full == root or full.startswith(root.rstrip(sep) + sep) for root in roots)

    def is_dir(path, stat=posix.stat, os_error=OSError, value_error=ValueError) -> bool:
        try:
            return stat(path).st_mode & 0o170000 == 0o040000
        except (os_error, value_error):
            return False

    def hook(event, args, forbidden=FORBIDDEN_EVENTS, forbidden_modules=FORBIDDEN_MODULES,
             read_events=types.MappingProxyType(dict(READ_EVENTS)), write_events=types.MappingProxyType(dict(WRITE_EVENTS)),
             readable=(workdir, *library_roots, *DEVICES), writable=(workdir, "/dev/null"), library_roots=library_roots,
             pid=os.getpid(), write_flags=WRITE_FLAGS, native_suffixes=NATIVE_SUFFIXES,
             o_directory=getattr(os, "O_DIRECTORY", 0), inside=inside, is_dir=is_dir, type_=type, str_=str, int_=int,
             any_=any, bool_=bool, permission_error=PermissionError, module_not_found=ModuleNotFoundError,
             protected=()) -> None:
        if type_(event) is not str_:  # only sys.audit from the program sends anything else
            raise permission_error("the sandbox does not allow audit events that are not plain strings")
        if event in forbidden:
            raise permission_error(f"the sandbox does not allow {event}")
        if event == "import":
            name, filename = args[0], args[1]
            if type_(name) is str_ and name.partition(".")[0] in forbidden_modules:
                raise module_not_found(f"the sandbox does not allow importing {name}", name=name)
            if type_(filename) is str_ and filename.endswith(native_suffixes) and not inside(filename, library_roots):
                raise permission_error(f"the sandbox does not allow loading native code from {filename!r}")
        elif event == "os.kill" and args[0] != pid:
            raise permission_error("the sandbox does not allow signalling other processes")
        elif event == "resource.prlimit" and (args[0] not in (0, pid) or args[2] is not None):
            raise permission_error("the sandbox does not allow changing limits")
        elif event == "object.__setattr__" and (type_(args[1]) is not str_ or args[1] == "__code__"
                                                 or any_(args[0] is f for f in protected)):
            raise permission_error(f"the sandbox does not allow replacing a function's {args[1]}")
        elif event == "open":
            path, mode, flags = args
            if path is None:
                return
            # A mode that is not a plain str (a subclass answering `in` as it likes) counts as writing.
            writes = any_(c in mode for c in "wax+") if type_(mode) is str_ else (
                mode is not None or type_(flags) is not int_ or bool_(flags & write_flags))
            if not inside(path, writable if writes else readable):
                raise permission_error(f"the sandbox does not allow {'writing' if writes else 'reading'} {path!r}: "
                                       "work in the current directory")
            # A folder's descriptor would be a dir_fd for os.open, os.remove and the rest, which resolve
            # relative paths against it, around the checks here (relative to the fixed cwd).
            if type_(path) is not int_ and ((type_(flags) is int_ and flags & o_directory) or is_dir(path)):
                raise permission_error(f"the sandbox does not allow opening the folder {path!r}: "
                                       "work in the current directory")
        elif event in read_events:
            for path in args[:read_events[event]]:
                if path is not None and not inside(path, readable):
                    raise permission_error(f"the sandbox does not allow listing {path!r}")
        elif event in write_events:
            for path in args[:write_events[event]]:
                if path is None or (event == "sqlite3.connect" and type_(path) is str_ and path in (":memory:", "")):
                    continue
                if not inside(path, writable):
                    raise permission_error(f"the sandbox does not allow changing {path!r}: work in the current directory")

    # The functions whose defaults hold the state: replacing those defaults (or code) is refused.
    hook.__defaults__ = (*hook.__defaults__[:-1], (hook, inside, resolve, is_dir))
    return hook


if __name__ == "__main__":
    main()
