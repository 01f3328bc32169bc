"""The Python tool's sandbox against programs written to get out (issue 26), one family at a time.

Each attack runs three ways:
- "os-layer": bubblewrap alone (guard=False), the boundary the tool uses by default;
- "guard-alone": the audit hook alone (isolate=False), what `--tool-sandbox guard-only` gives;
- "no-layer" (some families): neither, to show the attack is real: there it must succeed,
  so a test that passes on the layers is not passing because the attack was broken.

What counts as an escape is what the host would see: a file of this test read or
written, a process of this test signalled or limited, a file made outside the call.
Tests of the OS layer need a working bubblewrap (`apt-get install bubblewrap`) and are
skipped, saying so, where it is absent or cannot make namespaces.
"""

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from grpo_mlx.envs.sandbox import SandboxLimits, linux_command, macos_profile, os_layer_problem, run_python
from grpo_mlx.envs.sandbox_os import CHILD, interpreter_folders

LINUX = sys.platform.startswith("linux")
LIMITS = SandboxLimits(timeout=3, cpu_seconds=3, memory_bytes=512 << 20, output_chars=2000, file_bytes=1 << 20,
                       processes=16, folder_bytes=4 << 20)
SECRET = "TOP-SECRET-42"
NO_BWRAP = not LINUX or os_layer_problem() is not None
needs_bwrap = pytest.mark.skipif(NO_BWRAP, reason="needs a working bubblewrap (bwrap): absent or no namespaces here")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux: /proc, pidfds, _posixshmem")

OS_LAYER = pytest.param({"guard": False, "isolate": True}, id="os-layer", marks=needs_bwrap)
GUARD_ALONE = pytest.param({"guard": True, "isolate": False}, id="guard-alone")
NO_LAYER = pytest.param({"guard": False, "isolate": False}, id="no-layer")
LAYERS = [OS_LAYER, GUARD_ALONE]


def escaped(layer: dict) -> bool:
    """Whether an attack must succeed under `layer` (the control), rather than fail."""
    return not layer["guard"] and not layer["isolate"]


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret" / "kept.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.fixture
def host_process():
    """A process of this test's user, with a secret in its environment, for programs to aim at."""
    process = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", "GRPO_TEST_TOKEN": SECRET})
    yield process
    process.kill()
    process.wait()


# ---------------------------------------------------------------- guard tampering

TAMPERING = {
    # The old child's __main__ was the guard module: its forbidden-event list could be emptied.
    "main-module": """
import __main__, sys
for module in list(sys.modules.values()):
    for name in ("FORBIDDEN_EVENTS", "READ_EVENTS", "WRITE_EVENTS"):
        value = getattr(module, name, None)
        if hasattr(value, "clear"):
            value.clear()
""",
    # Patching what the hook calls: os.path.realpath, os.getcwd and builtins.
    "patched-functions": """
import os, builtins
os.path.realpath = lambda path, **kw: os.getcwd()
builtins.any = lambda items: True
builtins.isinstance = lambda *args: True
""",
    # The hook's closure through gc: widen the folders it allows, empty the events it refuses.
    "gc-closure": """
import gc
for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ == "hook" and obj.__closure__:
        for cell in obj.__closure__:
            value = cell.cell_contents
            if isinstance(value, list):
                value.append("/")
            elif isinstance(value, (set, dict)):
                value.clear()
            elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                cell.cell_contents = ("/",)
            elif isinstance(value, frozenset):
                cell.cell_contents = frozenset()
""",
    # The hook's frame, from the traceback of a refusal: mutate what its locals hold.
    "hook-frame": """
try:
    open("/etc/hostname")
except Exception as exc:
    tb = exc.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    for value in tb.tb_frame.f_locals.values():
        if isinstance(value, list):
            value.append("/")
        elif isinstance(value, (set, dict)):
            value.clear()
""",
    # The same frame's locals written to: from Python 3.13 (PEP 667) f_locals writes through to the
    # frame's variables, the closure's cells included.
    "hook-frame-write": """
try:
    open("/etc/hostname")
except Exception as exc:
    tb = exc.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    frame = tb.tb_frame
    while frame is not None:
        names = frame.f_locals
        for key, value in list(names.items()):
            try:
                if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                    names[key] = ("/",)
                elif isinstance(value, frozenset):
                    names[key] = frozenset()
            except Exception:
                pass
        frame = frame.f_back
""",
    # Replacing a function's code (the hook's, once found) with a do-nothing.
    "code-swap": """
import gc
def nothing(event, args):
    pass
for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ == "hook":
        obj.__code__ = nothing.__code__
""",
}


PAYLOAD = """
import os
try:
    print(open({secret!r}).read())
except Exception as exc:
    print("read refused:", exc)
try:
    os.system("cat {secret}")
except Exception as exc:
    print("process refused:", exc)
"""


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("attack", TAMPERING)
def test_tampering_with_the_guard_does_not_open_the_users_files(attack, layer, secret_file):
    """Each tampering is followed by reading a file of this test, directly and through a shell: it must
    stay unread."""
    result = run_python(TAMPERING[attack] + PAYLOAD.format(secret=str(secret_file)), LIMITS, **layer)
    assert SECRET not in result.text, result.text
    if layer["guard"]:  # the tampering itself, or what follows it, is refused in words the model can read
        assert "the sandbox does not allow" in result.text, result.text


def test_the_program_runs_in_its_own_main_module_not_the_guards():
    code = ("import __main__, sys\nprint(__main__.__dict__.get('FORBIDDEN_EVENTS'), 'sandbox_child' in sys.modules,\n"
            "      [n for n in ('guard', 'main', 'set_limits') if hasattr(__main__, n)])\n"
            "class Point: pass\nimport pickle\nprint(pickle.loads(pickle.dumps(Point())).__class__.__name__)")
    result = run_python(code, LIMITS, isolate=False)
    assert (result.text, result.error) == ("None False []\nPoint", False)


# ---------------------------------------------------------------- processes

@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_unaudited_process_starters_do_not_reach_the_host(layer, tmp_path):
    """multiprocessing.util.spawnv_passfds (_posixsubprocess.fork_exec underneath, no audit event) starts a
    Python that writes a file of this test."""
    target = tmp_path / "spawned.txt"
    child = f"open({str(target)!r}, 'w').write('x')"
    code = ("import sys, time\nfrom multiprocessing.util import spawnv_passfds\n"
            f"python = sys.executable.encode()\nspawnv_passfds(python, [python, b'-c', {child.encode()!r}], ())\n"
            "time.sleep(1)\nprint('spawned')\n")
    result = run_python(code, LIMITS, **layer)
    assert target.exists() == escaped(layer), result.text
    if layer["guard"]:
        assert "the sandbox does not allow importing multiprocessing" in result.text
    else:  # the process started: what kept it from the file is the OS layer
        assert "spawned" in result.text, result.text


@pytest.mark.parametrize("module, call", [
    ("_posixsubprocess", "_posixsubprocess.fork_exec()"),
    ("_posixshmem", "_posixshmem.shm_open('/grpo-mlx-probe', 0o100 | 2, 0o600)"),
    ("ctypes", "ctypes.CDLL(None).system(b'true')"),
])
def test_the_guard_refuses_unaudited_starters_and_native_calls(module, call):
    try:
        result = run_python(f"import {module}\n{call}\nprint('ran')", LIMITS, isolate=False)
        assert result.error and "ran" not in result.text and "the sandbox does not allow" in result.text, result.text
    finally:  # in case the guard let it through
        Path("/dev/shm/grpo-mlx-probe").unlink(missing_ok=True)


@linux_only
@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_other_processes_cannot_be_signalled_or_limited(layer, host_process):
    """os.kill, pidfd_send_signal (no audit event) and prlimit aimed at a process of this test."""
    pid = host_process.pid
    code = (f"import os, signal, resource\npid = {pid}\n"
            "for name, attempt in [('prlimit', lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, 3))),\n"
            "                      ('pidfd', lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGSTOP)),\n"
            "                      ('kill', lambda: os.kill(pid, signal.SIGKILL))]:\n"
            "    try:\n        attempt()\n        print(name, 'worked')\n"
            "    except Exception as exc:\n        print(name, 'refused:', exc)\n")
    result = run_python(code, LIMITS, **layer)
    time.sleep(0.05)
    if escaped(layer):
        assert host_process.poll() == -signal.SIGKILL
        return
    assert "worked" not in result.text, result.text
    assert host_process.poll() is None
    assert resource.prlimit(pid, resource.RLIMIT_NOFILE)[0] != 3
    assert Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T"  # not stopped


@linux_only
@pytest.mark.parametrize("layer", [OS_LAYER, pytest.param({"guard": False, "isolate": False}, id="guard-only-off")])
def test_the_process_count_holds_also_as_root(layer):
    """Without the guard (as if a program got around it), a fork bomb meets the process limit: RLIMIT_NPROC
    under bubblewrap (as the call's own uid when the trainer is root), else the parent's count (as root) or RLIMIT_NPROC."""
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError:\n    print('limited at', n)\n")
    started = time.perf_counter()
    result = run_python(code, LIMITS, **layer)
    assert result.error or "limited at" in result.text
    assert ("limited at" in result.text and int(result.text.split("limited at")[1].split()[0]) <= LIMITS.processes) \
        or f"started more than {LIMITS.processes} processes" in result.text, result.text
    assert time.perf_counter() - started < LIMITS.timeout + 2


def test_the_guard_refuses_making_a_built_in_module_anew():
    """_imp.create_builtin would hand back posix and _signal with the functions the guard disarmed."""
    code = ("import _imp, importlib.machinery\nfor name in ('posix', '_signal'):\n"
            "    try:\n        print(name, _imp.create_builtin(importlib.machinery.ModuleSpec(name, None)))\n"
            "    except PermissionError as exc:\n        print(name, 'refused:', exc)\n")
    result = run_python(code, LIMITS, isolate=False)
    assert result.text.count("refused: the sandbox does not allow making a built-in module anew") == 2, result.text


@pytest.mark.parametrize("layer", LAYERS)
def test_a_program_cannot_lift_its_own_limits(layer):
    """As root, RLIMIT_AS and the rest could be raised again from inside: the OS layer runs the program as
    a uid of its own, the guard refuses setrlimit and prlimit with new limits."""
    code = ("import resource\nfor name in ('RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_CPU'):\n"
            "    which = getattr(resource, name)\n    try:\n"
            "        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n        print(name, 'lifted')\n"
            "    except (ValueError, OSError) as exc:\n        print(name, 'kept:', exc)\n"
            "try:\n    resource.prlimit(0, resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n    print('prlimit lifted')\n"
            "except (ValueError, OSError) as exc:\n    print('kept:', exc)\n")
    result = run_python(code, LIMITS, **layer)
    assert "lifted" not in result.text, result.text


@needs_bwrap
def test_calls_side_by_side_each_get_their_own_process_budget():
    """RLIMIT_NPROC counts a uid's processes: as root each call runs as a uid of its own (never root), so
    two fork bombs at once each reach their own limit rather than sharing one."""
    from concurrent.futures import ThreadPoolExecutor

    code = ("import os, time\nprint('uid', os.getuid())\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    print('limited at', n)\n")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_python(code, LIMITS, guard=False), range(2)))
    uids = [int(r.text.split("uid")[1].split()[0]) for r in results]
    counts = [int(r.text.split("limited at")[1].split()[0]) for r in results]
    assert 0 not in uids and (os.geteuid() != 0 or uids[0] != uids[1]), uids
    assert all(LIMITS.processes - 3 <= n <= LIMITS.processes for n in counts), [r.text for r in results]


# ---------------------------------------------------------------- native code

@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_ctypes_calling_libc_does_not_reach_the_host(layer, tmp_path):
    target = tmp_path / "touched"
    code = f"import ctypes\nctypes.CDLL(None).system(b'touch {target}')\n"
    result = run_python(code, LIMITS, **layer)
    assert target.exists() == escaped(layer), result.text
    if layer["guard"]:
        assert "the sandbox does not allow ctypes.dlopen" in result.text


def test_the_guard_refuses_native_modules_from_outside_the_library():
    """A .so the program puts in its folder, then imports: refused before it is loaded."""
    import _csv
    name = os.path.basename(_csv.__file__)
    code = f"open({name!r}, 'wb').write(open({_csv.__file__!r}, 'rb').read())\nimport _csv\nprint('loaded')"
    result = run_python(code, LIMITS, isolate=False)
    assert result.error and "loaded" not in result.text
    assert "the sandbox does not allow loading native code" in result.text, result.text


@pytest.mark.parametrize("opening", ["open('/dev/zero', 'a')", "open('/dev/zero', 'ab')", "open('/dev/zero', 'r+')",
                                     "open('/dev/zero', 'w')", "os.open('/dev/zero', os.O_WRONLY | os.O_APPEND)"])
def test_the_guard_counts_every_writing_mode_as_writing(opening):
    """A file the guard lets the program read (a library file, a device) is not one it may append to:
    a mode read as reading would let a program add code to a library module the user's next Python runs.
    /dev/zero is readable, not writable, and harmless to write should the guard let it through."""
    result = run_python(f"import os\n{opening}\nprint('opened')", LIMITS, isolate=False)
    assert result.error and "opened" not in result.text, result.text
    assert "the sandbox does not allow writing '/dev/zero'" in result.text, result.text


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_changing_directory_does_not_reach_the_users_files(layer, secret_file):
    code = f"import os\nos.chdir({str(secret_file.parent)!r})\nprint(open('kept.txt').read())"
    result = run_python(code, LIMITS, **layer)
    assert (SECRET in result.text) == escaped(layer), result.text


@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_a_folder_descriptor_with_a_deep_cwd_does_not_reach_the_users_files(layer, secret_file):
    """A descriptor of the working folder, and a cwd deep enough that the relative path looks inside the
    folder when read from the cwd (20 levels up of 40), while from the descriptor it climbs to the root."""
    relative = os.path.relpath(secret_file, "/")
    code = ("import os\nfd = os.open('.', os.O_RDONLY)\nos.makedirs('a/' * 40, exist_ok=True)\nos.chdir('a/' * 40)\n"
            f"print(os.read(os.open('../' * 20 + {relative!r}, os.O_RDONLY, dir_fd=fd), 100).decode())")
    result = run_python(code, LIMITS, **layer)
    assert (SECRET in result.text) == escaped(layer), result.text
    if layer["guard"]:
        assert "the sandbox does not allow" in result.text


@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_a_thread_flipping_the_cwd_does_not_win_a_race(layer, secret_file):
    """Seen from the deep folder the path stays inside the working folder; seen from the working folder
    it climbs to the root: a thread flipping the cwd between the two makes the guard check one and the
    kernel open the other."""
    relative = os.path.relpath(secret_file, "/")
    code = ("import os, threading\nhome = os.getcwd()\nups = home.count('/') + 2\ndeep = home + '/d' * ups\n"
            "os.makedirs(deep, exist_ok=True)\npath = '../' * ups + " + repr(relative) + "\nstop = False\n"
            "def flip():\n    while not stop:\n        os.chdir(deep)\n        os.chdir(home)\n"
            "threading.Thread(target=flip, daemon=True).start()\nfound = None\n"
            "for _ in range(3000):\n    try:\n        found = open(path).read()\n        break\n"
            "    except OSError:\n        pass\nstop = True\n"
            # then once more with the flipping stopped at home: under load the control case could lose the race
            "if found is None:\n    import time\n    time.sleep(0.05)\n    os.chdir(home)\n    try:\n"
            "        found = open(path).read()\n    except OSError:\n        pass\nprint(found)")
    result = run_python(code, LIMITS, **layer)
    assert (SECRET in result.text) == escaped(layer), result.text


@linux_only
@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_another_processs_environment_is_out_of_reach(layer, host_process):
    code = f"print(open('/proc/{host_process.pid}/environ', 'rb').read())"
    result = run_python(code, LIMITS, **layer)
    assert (SECRET in result.text) == escaped(layer), result.text


C_OPENS = {
    "sqlite3": "import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')",
    "readline": "import readline\nreadline.write_history_file({target!r})",
    "mkfifo": "import os\nos.mkfifo({target!r})",
}


@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
@pytest.mark.parametrize("how", C_OPENS)
def test_files_made_from_c_stay_inside(how, layer, tmp_path):
    """sqlite3, readline and mkfifo make their files in C, where no `open` event is raised."""
    if how == "readline":
        pytest.importorskip("readline")
    target = tmp_path / f"made-by-{how}"
    result = run_python(C_OPENS[how].format(target=str(target)), LIMITS, **layer)
    assert target.exists() == escaped(layer), result.text
    if layer["guard"]:
        assert "the sandbox does not allow" in result.text, result.text


@linux_only
@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_shared_memory_stays_inside(layer):
    name = f"grpo-mlx-probe-{os.getpid()}"
    code = f"import _posixshmem, os\nos.close(_posixshmem.shm_open('/{name}', os.O_CREAT | os.O_RDWR, 0o600))"
    try:
        result = run_python(code, LIMITS, **layer)
        assert Path(f"/dev/shm/{name}").exists() == escaped(layer), result.text
    finally:
        Path(f"/dev/shm/{name}").unlink(missing_ok=True)


@pytest.mark.parametrize("layer", [*LAYERS, NO_LAYER])
def test_the_user_database_is_out_of_reach(layer):
    """pwd reads /etc/passwd in C, unseen by the hook: the guard shows it empty, the OS layer has none."""
    result = run_python("import pwd\nprint([p.pw_name for p in pwd.getpwall()])", LIMITS, **layer)
    assert ("root" in result.text) == escaped(layer), result.text


THREADED_BLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")


@needs_bwrap
@pytest.mark.skipif(not THREADED_BLAS.exists(), reason="needs Debian's threaded OpenBLAS")
def test_the_probe_runs_in_the_environment_a_call_gets(monkeypatch):
    """A user's LD_PRELOAD of a threaded BLAS (no thread count) hung the probe for its 30 s and turned the layer off."""
    monkeypatch.setenv("LD_PRELOAD", str(THREADED_BLAS))
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert os_layer_problem.__wrapped__() is None


@needs_bwrap
def test_under_the_os_layer_the_system_shows_only_what_python_needs():
    """No home, no /tmp of the host, no user database, only the call's processes, no network interfaces."""
    code = ("import os, pwd\nprint(sorted(os.listdir('/')))\nprint(os.path.exists(os.path.expanduser('~root')))\n"
            "print([p.pw_name for p in pwd.getpwall()])\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(os.listdir('/sys') if os.path.exists('/sys') else 'no /sys')")
    result = run_python(code, LIMITS, guard=False)
    top, _, users, pids, sys_folder = result.text.splitlines()
    # The system's own folders, plus the top of each path the layer mounts (the interpreter's folders, the
    # guard, the program's folder): wherever the checkout or the virtual environment lives, nothing else.
    mounted = [*interpreter_folders(), CHILD, tempfile.gettempdir()]
    allowed = {"usr", "bin", "lib", "lib32", "lib64", "sbin", "etc", "proc", "dev"} | {Path(p).parts[1] for p in mounted}
    assert set(eval(top)) <= allowed, (eval(top), allowed)
    assert eval(users) == [] and len(eval(pids)) <= 3 and sys_folder == "no /sys"
    assert not Path.home().is_relative_to("/usr")


@needs_bwrap
def test_the_folder_holds_a_bounded_number_of_bytes():
    code = "with open('big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'x' * (1 << 20))"
    result = run_python(code, SandboxLimits(**{**LIMITS.__dict__, "file_bytes": 1 << 30}), guard=False)
    assert result.error and "No space left on device" in result.text, result.text


def test_guard_only_the_parent_bounds_the_folder():
    code = ("import time\nfor i in range(1000):\n    with open(f'f{i}', 'wb') as f:\n        f.write(b'x' * (1 << 19))\n"
            "    time.sleep(0.01)")
    result = run_python(code, LIMITS, isolate=False)
    assert result.error and f"wrote more than {LIMITS.folder_bytes} bytes to its folder" in result.text, result.text


# ---------------------------------------------------------------- the command lines, as text

def test_the_bubblewrap_command_binds_only_what_python_needs(tmp_path):
    work, program = tmp_path / "work", tmp_path / "program.py"
    command = linux_command(["python", "-I"], work, program, 1 << 20, as_root=True, folders=["/opt/py", "/home/u/venv"])
    text = " ".join(command)
    for part in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent", "--new-session",
                 "--proc /proc", "--ro-bind /usr /usr", "--ro-bind /opt/py /opt/py", "--ro-bind /home/u/venv /home/u/venv",
                 f"--size 1048576 --tmpfs {work}", "--remount-ro /", f"--chdir {work}", "--cap-add CAP_SETUID"):
        assert part in text, part
    binds = [command[i + 1] for i, word in enumerate(command) if word in ("--bind", "--ro-bind", "--dev-bind")]
    assert "/" not in binds and str(Path.home()) not in binds and "/tmp" not in binds and "/proc" not in binds
    assert "--bind" not in command  # nothing of the host is writable
    assert command[-2:] == ["python", "-I"]
    assert "--unshare-user" in linux_command(["python"], work, program, 1, as_root=False, folders=[])


def test_the_macos_profile_denies_network_writes_home_and_other_processes():
    profile = macos_profile(Path("/private/var/folders/x/work"), [Path("/Users/u/code/grpo_mlx/sandbox_child.py")],
                            home=Path("/Users/u"), folders=["/Users/u/.venv"],
                            python=["/Users/u/.venv/bin/python", "/usr/bin/python3"])
    lines = profile.splitlines()
    assert lines[:3] == ["(version 1)", "(allow default)", "(deny network*)"]
    assert '(deny file-write* (require-not (require-any (subpath "/private/var/folders/x/work") (literal "/dev/null"))))' in lines
    assert ('(deny file-read* (require-all (subpath "/Users/u") (require-not (require-any '
            '(subpath "/private/var/folders/x/work") (subpath "/Users/u/.venv") '
            '(literal "/Users/u/code/grpo_mlx/sandbox_child.py")))))') in lines
    assert "(deny process-fork)" in lines
    assert ('(deny process-exec* (require-not (require-any (literal "/Users/u/.venv/bin/python") '
            '(literal "/usr/bin/python3"))))') in lines
    assert "(deny process-info* (target others))" in lines and "(deny signal (target others))" in lines
    assert profile.count("(") == profile.count(")")
    assert '\\"' in macos_profile(Path('/w/"x'), [], home=Path("/h"), folders=[], python=["/p"])  # quotes escaped
