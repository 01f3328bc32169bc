"""Tools a model may call mid-solution: the calculator, the Python executor, and running calls in parallel.

Pure Python, no MLX. A tool takes one text argument (an expression, a program) and
answers text; it never raises: whatever goes wrong comes back as a `ToolResult` with
`error=True`, which the model sees as the observation.

Choices, and why:
1. The calculator parses with `ast` and walks the tree itself, allowing only
   numbers, + - * / // % ** and parentheses: `eval` would run anything. Integer
   results are capped (MAX_RESULT_BITS) before they are computed, so 10**10**10
   is an error, not a hung process.
2. Calls of different trajectories run concurrently in threads (`run_tool_calls`):
   the Python tool waits on a subprocess, which releases the GIL, so one slow
   program does not hold up the others.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ..core.errors import UserError


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered: the text the model sees, whether it is an error, and how long the call took."""

    text: str
    error: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a model's turn: the tool's name and its arguments ({"expression": "2*3"}).

    `error` says why a call the model attempted could not be read (malformed JSON); it
    is answered with that error instead of running anything.
    """

    name: str
    arguments: dict
    error: str | None = None


@dataclass(frozen=True)
class Tool:
    """A tool with one text argument.

    `argument` names it in the JSON schema ("expression", "code"); `fences` are the
    languages of the fenced blocks that call it in the plain format (```calc).
    """

    name: str
    description: str
    argument: str
    argument_description: str
    example: str  # an argument, for the plain format's instructions
    fences: tuple[str, ...]
    run: Callable[[str], ToolResult]

    def schema(self) -> dict:
        """The JSON schema chat templates render for `apply_chat_template(..., tools=[...])`."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {self.argument: {"type": "string", "description": self.argument_description}},
                    "required": [self.argument],
                },
            },
        }

    def call(self, arguments: dict) -> ToolResult:
        """Run the tool on `arguments`, timed; a missing or non-text argument is an error result."""
        start = time.perf_counter()
        value = arguments.get(self.argument) if isinstance(arguments, dict) else None
        if not isinstance(value, str):
            result = ToolResult(f"Error: {self.name} takes one text argument {self.argument!r}", error=True)
        else:
            try:
                result = self.run(value)
            except Exception as exc:  # a tool answers; it never takes the trainer down
                result = ToolResult(f"Error: {self.name} failed ({type(exc).__name__}: {exc})", error=True)
        return ToolResult(result.text, result.error, time.perf_counter() - start)


# ---------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 1000
MAX_RESULT_BITS = 3400  # about 1000 decimal digits
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalculatorError(Exception):
    """An expression the calculator refuses or cannot evaluate; its message is what the model sees."""


def calculate(expression: str) -> ToolResult:
    """Evaluate arithmetic on numbers with + - * / // % ** and parentheses; errors come back as text.

    Floats print with 12 significant digits (0.1 + 0.2 -> 0.3), whole floats as
    integers (6 / 3 -> 2). `^` is a syntax error, as in Python, not a power.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        return ToolResult(f"Error: expression longer than {MAX_EXPRESSION_CHARS} characters", error=True)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        value = _evaluate(tree.body)
    except SyntaxError as exc:
        return ToolResult(f"Error: not an arithmetic expression ({exc.msg})", error=True)
    except CalculatorError as exc:
        return ToolResult(f"Error: {exc}", error=True)
    except ZeroDivisionError:
        return ToolResult("Error: division by zero", error=True)
    except (OverflowError, ValueError, RecursionError, MemoryError):
        return ToolResult("Error: the result is too large", error=True)
    return ToolResult(_number_text(value))


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        _check_size(node.op, left, right)
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        return value
    raise CalculatorError(f"{_describe(node)} is not allowed; use numbers, + - * / // % ** and parentheses")


def _check_size(op: ast.operator, left, right) -> None:
    """Refuse an integer result over MAX_RESULT_BITS before computing it (floats overflow by themselves)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    else:
        return
    if bits > MAX_RESULT_BITS:
        raise CalculatorError(f"the result is too large (over {MAX_RESULT_BITS} bits, about 1000 digits)")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r}"
    if isinstance(node, ast.Constant):
        return f"the value {node.value!r}"
    return f"{type(node).__name__.lower()} ({ast.unparse(node)[:40]})"


def _number_text(value) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
    argument="expression",
    argument_description="the expression, e.g. 347 * 2816",
    example="347 * 2816",
    fences=("calc", "calculator"),
    run=calculate,
)


# ---------------------------------------------------------------- the registry

def python_tool(sandbox: str = "os", **limits) -> Tool:
    """The Python executor (sandbox.py) as a tool; `limits` are `SandboxLimits` fields (timeout=..., ...).

    `sandbox="os"` (the default) needs the OS layer and raises UserError, in one line saying why and
    naming the opt-in, where this machine has none; "guard-only" runs with the in-process guard alone."""
    from .sandbox import SANDBOX_MODES, SandboxLimits, os_layer_problem, run_python

    if sandbox not in SANDBOX_MODES:
        raise UserError(f"unknown tool sandbox {sandbox!r}: use {' or '.join(SANDBOX_MODES)}")
    if sandbox == "os" and (problem := os_layer_problem()):
        raise UserError(f"the python tool refuses to run without an OS sandbox: {problem}")
    sandbox_limits = SandboxLimits(**limits)
    isolate = sandbox == "os"

    def run(code: str) -> ToolResult:
        result = run_python(code, sandbox_limits, isolate=isolate)
        return ToolResult(result.text, result.error)

    return Tool(
        name="python",
        description="Run a Python program and see what it prints (print() the values you need).",
        argument="code",
        argument_description="the program",
        example="print(347 * 2816)",
        fences=("python", "py"),
        run=run,
    )


BUILTIN_TOOLS = {"calculator": lambda sandbox="os": CALCULATOR, "python": python_tool}


def get_tools(names: list[str], sandbox: str = "os") -> list[Tool]:
    """The built-in tools called `names` (`--tools calculator,python`), in order, each once; `sandbox`
    (`--tool-sandbox`) is what holds the python tool's programs."""
    tools = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        if name not in BUILTIN_TOOLS:
            raise UserError(f"unknown tool {name!r}: use {' or '.join(BUILTIN_TOOLS)}, e.g. --tools calculator")
        tools.append(BUILTIN_TOOLS[name](sandbox=sandbox))
    return tools


# ---------------------------------------------------------------- running calls

def run_tool_calls(calls: list[ToolCall], tools: list[Tool], max_workers: int | None = None) -> list[ToolResult]:
    """Run `calls` concurrently, one result per call in order; an unknown tool is an error result."""
    by_name = {tool.name: tool for tool in tools}

    def run_one(call: ToolCall) -> ToolResult:
        if call.error is not None:
            return ToolResult(f"Error: {call.error}", error=True)
        tool = by_name.get(call.name)
        if tool is None:
            known = ", ".join(by_name) or "none"
            return ToolResult(f"Error: there is no tool {call.name!r} (tools: {known})", error=True)
        return tool.call(call.arguments)

    if len(calls) <= 1:
        return [run_one(call) for call in calls]
    with ThreadPoolExecutor(max_workers=max_workers or min(len(calls), 32)) as pool:
        return list(pool.map(run_one, calls))
