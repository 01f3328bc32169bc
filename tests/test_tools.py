"""Tools: the calculator's arithmetic and refusals, the Python sandbox's limits, calls run concurrently."""

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from grpo_mlx.core.errors import UserError
from grpo_mlx.envs.sandbox import MARKER, SandboxLimits, os_layer_problem, run_python
from grpo_mlx.envs.tools import CALCULATOR, MAX_RESULT_BITS, ToolCall, calculate, get_tools, python_tool, run_tool_calls

LINUX = sys.platform.startswith("linux")
LIMITS = SandboxLimits(timeout=2, cpu_seconds=2, memory_bytes=256 << 20, output_chars=400, file_bytes=1 << 20)
SLACK = 1.5  # seconds beyond the timeout for starting Python and killing what it left on a loaded machine
# The tests below that are not about the OS layer run under it where this machine has it (bubblewrap),
# else with the guard alone, so they pass either way; tests/test_sandbox.py tests each layer alone.
OS_LAYER = os_layer_problem() is None
SANDBOX = "os" if OS_LAYER else "guard-only"


def run_here(code: str, limits: SandboxLimits = LIMITS, **layers):
    return run_python(code, limits, **{"isolate": OS_LAYER, **layers})


# ---------------------------------------------------------------- calculator

@pytest.mark.parametrize("expression, value", [
    ("347 * 2816", "977152"),
    ("2 + 3 * (4 - 1)", "11"),
    ("-3 ** 2", "-9"),
    ("(-3) ** 2", "9"),
    ("+5 - -2", "7"),
    ("7 / 2", "3.5"),
    ("6 / 3", "2"),  # whole floats print as integers
    ("0.1 + 0.2", "0.3"),  # 12 significant digits
    ("17 // 5", "3"),
    ("17 % 5", "2"),
    ("2 ** 10", "1024"),
    ("2 ** -1", "0.5"),
    ("  12 * 12 \n", "144"),
    ("1.5e3 + 1", "1501"),
])
def test_calculator_evaluates_arithmetic(expression, value):
    result = calculate(expression)
    assert (result.text, result.error) == (value, False)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('echo hacked')", "is not allowed"),
    ("x + 1", "the name 'x' is not allowed"),
    ("abs(-1)", "is not allowed"),
    ("[1, 2]", "is not allowed"),
    ("1 if 1 else 2", "is not allowed"),
    ("'a' * 3", "the value 'a' is not allowed"),
    ("True + 1", "the value True is not allowed"),
    ("2j * 2", "is not allowed"),
    ("1 < 2", "is not allowed"),
    ("1 << 3", "is not allowed"),
    ("2 ^ 3", "is not allowed"),
    ("(1).real", "is not allowed"),
    ("(lambda: 1)()", "is not allowed"),
    ("1 +", "not an arithmetic expression"),
    ("", "not an arithmetic expression"),
    ("a = 1", "not an arithmetic expression"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("10.0 ** 400", "too large"),
    ("10 ** 10 ** 10", "too large"),
    ("9 ** 9 ** 9", "too large"),
    ("(10 ** 999) * (10 ** 999)", "too large"),
    (f"2 ** {MAX_RESULT_BITS + 1}", "too large"),
    ("1" + " + 1" * 600, "longer than"),
])
def test_calculator_refuses_as_an_error_result_never_an_exception(expression, message):
    start = time.perf_counter()
    result = calculate(expression)
    assert result.error and result.text.startswith("Error: ") and message in result.text
    assert time.perf_counter() - start < 0.5  # 10 ** 10 ** 10 is refused, not computed


def test_calculator_tool_call_checks_its_argument():
    assert CALCULATOR.call({"expression": "2 * 21"}).text == "42"
    for arguments in ({}, {"expression": 42}, {"code": "1"}):
        result = CALCULATOR.call(arguments)
        assert result.error and "'expression'" in result.text


def test_unknown_tool_name_is_a_user_error():
    assert [t.name for t in get_tools(["calculator", " python", "calculator"], sandbox=SANDBOX)] == ["calculator", "python"]
    with pytest.raises(UserError, match="unknown tool 'abacus': use calculator or python"):
        get_tools(["abacus"])


# ---------------------------------------------------------------- sandbox


def live_processes_of(result) -> list[int]:
    """Processes (not zombies) still in the program's process group or carrying its run marker."""
    marker = f"{MARKER}={result.run_id}".encode()
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
            if stat[0] in (b"Z", b"X"):
                continue
            if int(stat[2]) == result.process_group or marker in Path(f"/proc/{pid}/environ").read_bytes():
                alive.append(int(pid))
        except OSError:
            pass
    return alive


def assert_ended_cleanly(result, started: float, limits: SandboxLimits = LIMITS) -> None:
    """An error result, within the timeout, no process of the call left running."""
    assert result.error
    assert time.perf_counter() - started < limits.timeout + SLACK
    if LINUX:
        assert live_processes_of(result) == []
    else:  # no /proc: the group must be gone (zombies included)
        with pytest.raises(ProcessLookupError):
            os.killpg(result.process_group, 0)


def test_a_program_prints_and_works_in_its_own_folder_which_is_removed_afterwards():
    code = "import os\nopen('note.txt', 'w').write('347')\nprint(int(open('note.txt').read()) * 2816)\nprint(os.getcwd())"
    result = run_here(code, LIMITS)
    value, folder = result.text.splitlines()
    assert (value, result.error) == ("977152", False)
    assert "grpo-mlx-sandbox-" in folder and not Path(folder).exists()


def test_the_environment_is_scrubbed_and_home_is_the_work_folder(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_SECRET_TOKEN", "hunter2")
    code = "import os\nprint(os.environ.get('GRPO_TEST_SECRET_TOKEN'))\nprint(os.path.expanduser('~') == os.getcwd())"
    assert run_here(code, LIMITS).text.splitlines() == ["None", "True"]


def test_an_exception_shows_the_program_traceback_as_an_error():
    result = run_here("x = 1\ny = x / 0", LIMITS)
    assert result.error and "line 2" in result.text and "ZeroDivisionError" in result.text
    assert "sandbox_child" not in result.text  # the launcher's own frame is left out
    result = run_here("def (", LIMITS)
    assert result.error and "SyntaxError" in result.text


def test_an_endless_loop_is_stopped_at_the_timeout():
    started = time.perf_counter()
    result = run_here("print('started')\nwhile True:\n    pass", LIMITS)
    assert_ended_cleanly(result, started)
    assert result.text.startswith("started")  # output before the kill survives (unbuffered)
    assert "Error: the program ran longer than 2 s" in result.text or "killed by SIGXCPU" in result.text


def test_sleeping_forever_is_stopped_at_the_timeout():
    started = time.perf_counter()
    result = run_here("import time\ntime.sleep(600)", LIMITS)
    assert_ended_cleanly(result, started)
    assert result.timed_out and "ran longer than 2 s" in result.text


@pytest.mark.skipif(not LINUX, reason="macOS does not enforce RLIMIT_AS")
def test_endless_allocation_ends_with_a_memory_error():
    # The memory bound, not the clock, must end it: 2 s of a loaded machine's time did not always zero 256 MB.
    limits = SandboxLimits(**{**LIMITS.__dict__, "timeout": 10, "cpu_seconds": 10})
    started = time.perf_counter()
    result = run_here("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))", limits)
    assert_ended_cleanly(result, started, limits)
    assert "MemoryError" in result.text and not result.timed_out


def test_megabytes_of_output_are_cut_to_the_bound():
    started = time.perf_counter()
    result = run_here("while True:\n    print('x' * 10000)", LIMITS)
    assert_ended_cleanly(result, started)
    assert len(result.text) < LIMITS.output_chars + 300
    assert "bytes cut" in result.text and f"more than {LIMITS.file_bytes} bytes" in result.text


def test_a_fork_bomb_is_refused_by_the_guard():
    started = time.perf_counter()
    result = run_here("import os\nwhile True:\n    os.fork()", LIMITS)
    assert_ended_cleanly(result, started)
    assert "PermissionError: the sandbox does not allow os.fork" in result.text
    assert "sandbox_child" not in result.text  # the guard's own frame is left out of the traceback
    result = run_here("import subprocess\nsubprocess.run(['sleep', '100'])", LIMITS)
    assert result.error and "does not allow subprocess.Popen" in result.text


ESCAPING_CHILDREN = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()  # leave the process group
        if os.fork() == 0:
            time.sleep(600)
        time.sleep(600)
for _ in range(20):
    if os.fork() == 0:
        time.sleep(600)
print('forked', flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=pytest.mark.skipif(
    not OS_LAYER, reason="needs a working bubblewrap (bwrap)")), False], ids=["namespaces", "plain-process"])
def test_children_that_leave_the_process_group_do_not_survive(isolate):
    """Without the guard (as if a program got around it), forked children, some in their own
    sessions, all die by the time run_python returns."""
    if not LINUX and not isolate:
        pytest.skip("only Linux can find children that left the group (through /proc)")
    started = time.perf_counter()
    result = run_python(ESCAPING_CHILDREN, LIMITS, guard=False, isolate=isolate)
    assert_ended_cleanly(result, started)
    assert result.text.startswith("forked") and result.timed_out


def test_the_users_files_are_out_of_reach(tmp_path):
    """Reading the project's files (this test) or the home folder fails; so do writing, listing and
    deleting (aimed only at a folder of this test's own, in case the guard let them through)."""
    kept = tmp_path / "kept.txt"
    kept.write_text("TOP-SECRET-42")
    attempts = [f"print(open({str(Path(__file__).resolve())!r}).read())",
                f"import os\nprint(os.listdir({str(Path.home())!r}))",
                f"print(open({str(kept)!r}).read())",
                f"import os\nprint(os.listdir({str(tmp_path)!r}))",
                f"open({str(tmp_path / 'was_here')!r}, 'w')",
                f"import os\nos.remove({str(kept)!r})"]
    for code in attempts:
        result = run_here(code, LIMITS)
        assert result.error and "PermissionError: the sandbox does not allow" in result.text, code
        assert "TOP-SECRET-42" not in result.text and "['kept.txt']" not in result.text
    assert kept.read_text() == "TOP-SECRET-42" and sorted(os.listdir(tmp_path)) == ["kept.txt"]


def test_a_library_folder_cannot_become_a_dir_fd_for_writes():
    """os.open(name, ..., dir_fd=fd) resolves `name` against the folder `fd`, not the cwd the guard checks
    against: a readable library folder's descriptor let a program create (or delete) files in it."""
    import sysconfig
    library = sysconfig.get_paths()["stdlib"]
    probe = Path(library) / f"grpo_mlx_sandbox_probe_{os.getpid()}.txt"
    code = (f"import os\nfd = os.open({library!r}, os.O_RDONLY)\n"
            f"os.close(os.open({probe.name!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd))\nprint('escaped')")
    try:
        result = run_here(code, LIMITS)
        assert result.error and "PermissionError: the sandbox does not allow opening the folder" in result.text
        assert not probe.exists()
    finally:
        probe.unlink(missing_ok=True)


def test_sockets_are_refused_by_the_guard():
    result = run_here("import socket\nsocket.create_connection(('127.0.0.1', 9))", LIMITS)
    assert result.error and "PermissionError: the sandbox does not allow socket" in result.text


@pytest.mark.skipif(not LINUX or os_layer_problem() is not None, reason="needs bubblewrap (bwrap), absent or not working here")
def test_without_the_guard_the_network_namespace_still_has_no_network():
    """A listening socket on this machine's loopback cannot be reached from the new namespace."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        assert run_python(code, LIMITS, isolate=False, guard=False).text == "connected"  # the check can fail
        result = run_python(code, LIMITS, guard=False)
        assert result.error and "connected" not in result.text
    finally:
        server.close()


def test_installed_packages_import_under_the_guard():
    result = run_here("import numpy, fractions, math\nprint(numpy.arange(4).sum(), math.comb(5, 2))", LIMITS)
    assert (result.text, result.error) == ("6 10", False)


# ---------------------------------------------------------------- running calls


def test_python_calls_run_concurrently():
    """Four programs that sleep a second each take about a second together, not four."""
    tool = python_tool(sandbox=SANDBOX, timeout=5)
    calls = [ToolCall("python", {"code": f"import time\ntime.sleep(1)\nprint({i})"}) for i in range(4)]
    started = time.perf_counter()
    results = run_tool_calls(calls, [tool])
    assert time.perf_counter() - started < 2.5
    assert [(r.text, r.error) for r in results] == [("0", False), ("1", False), ("2", False), ("3", False)]
    assert all(r.seconds >= 1 for r in results)


def test_calls_to_unknown_tools_or_unreadable_calls_are_error_results():
    calls = [ToolCall("calculator", {"expression": "6 * 7"}), ToolCall("abacus", {}),
             ToolCall("", {}, error="the tool call is not valid JSON")]
    results = run_tool_calls(calls, [CALCULATOR])
    assert [r.error for r in results] == [False, True, True]
    assert results[0].text == "42"
    assert results[1].text == "Error: there is no tool 'abacus' (tools: calculator)"
    assert results[2].text == "Error: the tool call is not valid JSON"


# ---------------------------------------------------------------- the OS layer, or the opt-in to go without


def test_without_an_os_layer_the_python_tool_refuses_in_one_line_naming_the_opt_in(monkeypatch):
    """Never silently weaker: no OS layer, no python tool, unless --tool-sandbox guard-only says so."""
    import grpo_mlx.envs.sandbox as sandbox
    from grpo_mlx.envs.environments import environment_factory

    reason = "bubblewrap (bwrap) is not installed; install it or run with --tool-sandbox guard-only to rely on the guard"
    monkeypatch.setattr(sandbox, "os_layer_problem", lambda: reason)
    with pytest.raises(UserError) as refusal:
        get_tools(["calculator", "python"])
    assert "\n" not in str(refusal.value) and "--tool-sandbox guard-only" in str(refusal.value)
    with pytest.raises(UserError, match="refuses to run without an OS sandbox"):
        environment_factory(None, ["python"])
    assert [t.name for t in get_tools(["calculator"])] == ["calculator"]  # the calculator needs no sandbox
    result = run_python("print('ran')", LIMITS)  # called directly, it answers an error and runs nothing
    assert result.error and "ran" not in result.text and reason in result.text
    tool = get_tools(["python"], sandbox="guard-only")[0]  # the opt-in: the guard alone
    assert tool.call({"code": "print(6 * 7)"}).text == "42"
    assert environment_factory(None, ["python"], tool_sandbox="guard-only") is not None


def test_the_tool_sandbox_option_takes_os_or_guard_only():
    from grpo_mlx.core.config import EvalConfig, TrainConfig, build_config

    assert TrainConfig().tool_sandbox == "os" and EvalConfig().tool_sandbox == "os"
    assert build_config({}, {"tool_sandbox": "guard-only", "tools": "python"}, EvalConfig).tool_sandbox == "guard-only"
    with pytest.raises(UserError, match="tool_sandbox"):
        build_config({}, {"tool_sandbox": "none"}, EvalConfig)


@pytest.mark.parametrize("sandbox", [pytest.param("os", marks=pytest.mark.skipif(
    os_layer_problem() is not None, reason="needs a working bubblewrap (bwrap)")), "guard-only"])
def test_an_escape_attempt_is_an_error_result_of_the_turn(sandbox):
    """The tool answers, the episode goes on: an attempt to get out is a readable error, not an exception."""
    tool = get_tools(["python"], sandbox=sandbox)[0]
    for code in ("import os\nos.chdir('/')", "import ctypes\nctypes.CDLL(None)", "import multiprocessing",
                 f"print(open({str(Path(__file__).resolve())!r}).read())"):
        result = tool.call({"code": code})
        assert result.error and "the sandbox does not allow" in result.text, (code, result.text)
    assert tool.call({"code": "print(1 + 1)"}).text == "2"


@pytest.mark.skipif(not LINUX, reason="the Linux probe")
def test_the_probe_says_in_one_line_what_is_missing_and_the_way_out(monkeypatch):
    import shutil

    import grpo_mlx.envs.sandbox as sandbox

    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    problem = sandbox.os_layer_problem.__wrapped__()
    assert "\n" not in problem and "bubblewrap (bwrap) is not installed" in problem
    assert "apt-get install bubblewrap" in problem and "--tool-sandbox guard-only" in problem
