"""Environments: what answers a model's turn in a multi-turn rollout, and the tool-call formats.

Pure Python, no MLX. One `Environment` instance serves one trajectory:

    env.reset(example)                      # once, before the first turn
    obs = env.step(messages, turn_text)     # after every model turn
    # obs is None: the trajectory is done; else append obs.messages and let the model go on

`messages` is the conversation before the latest turn (chat messages with "role" and
"content": the prompt, earlier model turns and observations); `turn_text` is the model's
latest turn as decoded text. The base class is single-turn: done after the first turn,
which is plain GRPO. `ToolEnvironment` runs the calls it finds in a turn (`--tools
calculator`, `--tools python`) and answers their results. Plug-ins subclass
`Environment` and are named like reward plug-ins: `--env path/to/file.py:Class` or
`--env package.module:Class`.

Tool calls come in one of two formats, chosen from the tokenizer:
- "json": where the chat template renders tools Qwen2.5-style (`apply_chat_template(...,
  tools=[schema])` and calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
  calls are read from those tags and each result is a message with role "tool".
- "fenced" (every other template, and models without one): a call is a fenced block
  whose language names the tool (```calc, ```python), its result one "user" message
  holding an ```output block. A system-prompt text (`system_prompt`) explains this.

`run_episode` drives one environment with a scripted list of turns: the reference for
the batched rollout, which must give the same messages.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.errors import UserError
from ..core.plugins import accepted_kwargs, exception_text, import_file, import_module
from ..data.examples import Example
from .tools import Tool, ToolCall, ToolResult, get_tools, run_tool_calls

JSON_FORMAT = "json"
FENCED_FORMAT = "fenced"
MAX_CALLS_PER_TURN = 4
PLUGIN_LABEL = "environment plug-in"


class EnvironmentFailed(UserError):
    """An environment plug-in raised or answered something that is not an Observation or None."""


@dataclass
class Observation:
    """What an environment appends after the model's turn, and the tool accounting for metrics.

    `messages` are chat messages ({"role", "content"}), usually one; a turn with
    several template-format tool calls gets one "tool" message per call.
    """

    messages: list[dict]
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0


def add_tool_counts(trajectory, observation: Observation) -> None:
    """Add an observation's tool accounting to a trajectory's (`Episode`, the rollout's rows)."""
    trajectory.tool_calls += observation.tool_calls
    trajectory.tool_errors += observation.tool_errors
    trajectory.tool_seconds += observation.tool_seconds


class Environment:
    """Single-turn: no tools, done after the first turn. Subclass it for a multi-turn environment.

    `tool_schemas` (JSON schemas) go to `apply_chat_template(..., tools=...)` when
    the prompt is rendered; `system_prompt` is added to the system message (the
    fenced format's instructions). Both empty here.
    """

    tool_schemas: list[dict] = []
    system_prompt: str | None = None

    def reset(self, example: Example) -> None:
        """Start a trajectory for `example`."""

    def step(self, messages: list[dict], turn_text: str) -> Observation | None:
        """Answer the model's latest turn: an Observation to append, or None when the trajectory is done."""
        return None


class ToolEnvironment(Environment):
    """Runs the tool calls in each turn and answers their results; a turn without a call ends the trajectory.

    At most `max_calls_per_turn` calls of a turn run; the rest are answered with an error.
    """

    def __init__(self, tools: list[Tool], tool_format: str = FENCED_FORMAT,
                 max_calls_per_turn: int = MAX_CALLS_PER_TURN):
        if tool_format not in (JSON_FORMAT, FENCED_FORMAT):
            raise ValueError(f"tool_format must be {JSON_FORMAT!r} or {FENCED_FORMAT!r}, not {tool_format!r}")
        self.tools = list(tools)
        self.tool_format = tool_format
        self.max_calls_per_turn = max_calls_per_turn
        self.tool_schemas = [tool.schema() for tool in self.tools] if tool_format == JSON_FORMAT else []
        self.system_prompt = fenced_instructions(self.tools) if tool_format == FENCED_FORMAT and self.tools else None

    def step(self, messages: list[dict], turn_text: str) -> Observation | None:
        calls = parse_tool_calls(turn_text, self.tool_format, self.tools)
        if not calls:
            return None
        results = run_tool_calls(calls[:self.max_calls_per_turn], self.tools)
        skipped = ToolResult(f"Error: not run: at most {self.max_calls_per_turn} tool calls per turn", error=True)
        results += [skipped] * len(calls[self.max_calls_per_turn:])
        return Observation(observation_messages(results, self.tool_format), tool_calls=len(calls),
                           tool_errors=sum(r.error for r in results), tool_seconds=sum(r.seconds for r in results))


# ---------------------------------------------------------------- tool-call formats

_PROBE_TOOL = "grpo_mlx_probe_tool"
_PROBE_RESULT = "grpo_mlx_probe_result"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*([A-Za-z]+)[ \t]*\n(.*?)(?:\n?```|\Z)", re.DOTALL)


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tool schemas with `<tool_call>` instructions and a "tool" role.

    Renders a conversation with a probe tool and a probe tool result and looks for
    both, so a template that ignores `tools=` or the role counts as not supporting them.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "tool", "content": _PROBE_RESULT}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=[probe], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses the tool role or tools: plain format
        return False
    return isinstance(text, str) and _PROBE_TOOL in text and _PROBE_RESULT in text and "<tool_call>" in text


def tool_format(tokenizer) -> str:
    """JSON_FORMAT where the chat template supports tools (see `supports_tools`), else FENCED_FORMAT."""
    return JSON_FORMAT if supports_tools(tokenizer) else FENCED_FORMAT


def parse_tool_calls(turn_text: str, fmt: str, tools: list[Tool]) -> list[ToolCall]:
    """The tool calls in a model's turn, in order.

    json: each `<tool_call>` block (the last may be unclosed: generation may stop at
    `</tool_call>`), malformed ones as calls with `error` set. fenced: each block whose
    language is one of an enabled tool's fences (```calc, ```python); other blocks are
    text. An unclosed last block counts too.
    """
    if fmt == JSON_FORMAT:
        return [_json_call(body.strip()) for body in _TOOL_CALL.findall(turn_text)]
    by_fence = {fence: tool for tool in tools for fence in tool.fences}
    calls = []
    for language, body in _FENCE.findall(turn_text):
        tool = by_fence.get(language.lower())
        if tool is not None:
            calls.append(ToolCall(tool.name, {tool.argument: body}))
    return calls


def _json_call(body: str) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall("", {}, error=f"the tool call is not valid JSON ({exc.msg}); write "
                                      '{"name": "<tool>", "arguments": {...}}')
    arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
        return ToolCall("", {}, error='a tool call is {"name": "<tool>", "arguments": {...}}')
    return ToolCall(call["name"], arguments)


def observation_messages(results: list[ToolResult], fmt: str) -> list[dict]:
    """Tool results as chat messages: one "tool" message per result (json), or one "user" message
    with an ```output block per result (fenced)."""
    if fmt == JSON_FORMAT:
        return [{"role": "tool", "content": result.text} for result in results]
    return [{"role": "user", "content": "\n".join(f"```output\n{result.text}\n```" for result in results)}]


def fenced_instructions(tools: list[Tool]) -> str:
    """The system-prompt text that teaches the fenced format for `tools`."""
    lines = ["You can use tools. To call one, write a fenced block and end your turn; "
             "the result comes back in an ```output block."]
    for tool in tools:
        lines.append(f"{tool.name}: {tool.description} For example:\n```{tool.fences[0]}\n{tool.example}\n```")
    lines.append("When you know the answer, give it without a tool call.")
    return "\n".join(lines)


def text_between_turns(tokenizer, messages: list[dict], turn_text: str, observation: Observation,
                       tools: list[dict] | None = None) -> str:
    """The text the chat template puts between the end of the model's turn `turn_text` (which
    followed `messages`) and the start of its next turn: the end-of-turn marker, the
    observation, the next generation prompt. What a resumed rollout prefills.

    Raises UserError when the template does not render a conversation as an extension of
    its beginning (some re-render earlier turns), where resuming cannot work.
    """
    turn = {"role": "assistant", "content": turn_text}
    if not getattr(tokenizer, "chat_template", None):  # no template: the observation follows as plain text
        return "\n" + "\n".join(m["content"] for m in observation.messages) + "\n"
    kwargs = {"tools": tools} if tools else {}
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs) + turn_text
    after = tokenizer.apply_chat_template([*messages, turn, *observation.messages], tokenize=False,
                                          add_generation_prompt=True, **kwargs)
    if not after.startswith(before):
        raise UserError("this chat template renders earlier turns differently once a conversation goes on, "
                        "so multi-turn rollouts cannot resume it; use a model whose template extends the "
                        "conversation (Qwen2.5, Llama 3) or train single-turn")
    return after[len(before):]


# ---------------------------------------------------------------- plug-ins and the built-ins

def load_environment(spec: str) -> type[Environment]:
    """The Environment subclass named by `path/to/file.py:Class` or `package.module:Class`."""
    where, _, attr = spec.strip().rpartition(":")
    if not where or not attr:
        raise UserError(f"{PLUGIN_LABEL} {spec!r}: write it as path/to/file.py:Class or package.module:Class")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = import_file(spec, Path(where).expanduser(), PLUGIN_LABEL, "my_env.py:MyEnvironment")
    else:
        module = import_module(spec, where, PLUGIN_LABEL, "path/to/file.py:Class")
    cls = getattr(module, attr, None)
    if cls is None:
        defined = sorted(k for k, v in vars(module).items()
                         if inspect.isclass(v) and issubclass(v, Environment) and v.__module__ == module.__name__)
        raise UserError(f"{PLUGIN_LABEL} {spec!r}: {where} has no {attr!r} (environments there: "
                        f"{', '.join(defined) or 'none'}); fix the name after the colon")
    if not (inspect.isclass(cls) and issubclass(cls, Environment)):
        raise UserError(f"{PLUGIN_LABEL} {spec!r}: {attr} is a {type(cls).__name__}, not a subclass of "
                        "grpo_mlx.environments.Environment; subclass it and define step()")
    return cls


def environment_factory(env: str | None = None, tools: list[str] = (), tokenizer=None,
                        tool_sandbox: str = "os") -> Callable[[], Environment]:
    """What makes one fresh environment per trajectory, from `--env`, `--tools` and the model's tokenizer.

    No `env`: single-turn without tools, else a ToolEnvironment. A plug-in class gets
    `tools` (Tool objects) and `tool_format` as keyword arguments where its __init__
    takes them; it is built once here so a broken constructor fails before training.
    """
    tool_list = get_tools(list(tools), sandbox=tool_sandbox)
    fmt = tool_format(tokenizer)
    if env is None:
        return functools.partial(ToolEnvironment, tool_list, fmt) if tool_list else Environment
    cls = load_environment(env)
    kwargs = accepted_kwargs(cls, {"tools": tool_list, "tool_format": fmt})
    if tool_list and "tools" not in kwargs:
        raise UserError(f"{PLUGIN_LABEL} {env!r} takes no tools: drop --tools, or give its __init__ a `tools` parameter")
    try:
        cls(**kwargs)
    except Exception as exc:
        raise UserError(f"{PLUGIN_LABEL} {env!r}: creating it failed ({exception_text(exc)}); "
                        "its __init__ must work with no arguments (or only tools=, tool_format=)") from exc
    return functools.partial(cls, **kwargs)


# ---------------------------------------------------------------- driving environments

@dataclass
class Episode:
    """One trajectory as `run_episode` played it.

    `done` is True when the environment ended it, False when `max_turns` (or the
    scripted turns) ran out first. An observation answering the last allowed turn is
    counted in the tool fields but not appended: no model turn would follow it.
    """

    messages: list[dict]
    turns: int = 0
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    observations: list[Observation] = field(default_factory=list)

    def take_turn(self, env: Environment, turn_text: str, max_turns: int) -> bool:
        """Append the model's turn and the environment's answer; whether another turn follows."""
        observation = checked_step(env, self.messages, turn_text)
        self.messages.append({"role": "assistant", "content": turn_text})
        self.turns += 1
        if observation is None:
            self.done = True
            return False
        self.observations.append(observation)
        add_tool_counts(self, observation)
        if self.turns >= max_turns:
            return False
        self.messages.extend(observation.messages)
        return True


def initial_messages(example: Example, env: Environment, system_prompt: str | None = None) -> list[dict]:
    """The prompt's messages: a system message (the user's system prompt, then the environment's), then the example."""
    system = "\n\n".join(text for text in (system_prompt, env.system_prompt) if text)
    messages = [{"role": "system", "content": system}] if system else []
    if isinstance(example.prompt, str):
        return [*messages, {"role": "user", "content": example.prompt}]
    if system and example.prompt and example.prompt[0].get("role") == "system":  # merge into the example's own
        first = example.prompt[0]
        return [{"role": "system", "content": f"{system}\n\n{first['content']}"}, *example.prompt[1:]]
    return [*messages, *example.prompt]


def checked_step(env: Environment, messages: list[dict], turn_text: str) -> Observation | None:
    """`env.step`, with a plug-in's exception or malformed answer raised as EnvironmentFailed naming it."""
    name = f"environment {type(env).__module__}.{type(env).__qualname__}"
    try:
        observation = env.step(list(messages), turn_text)  # a copy: the conversation is the driver's
    except Exception as exc:
        raise EnvironmentFailed(f"{name} failed on turn {turn_text[:60]!r} ({exception_text(exc)})") from exc
    if observation is None:
        return None
    if not isinstance(observation, Observation) or not isinstance(observation.messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in observation.messages):
        raise EnvironmentFailed(f"{name} answered {type(observation).__name__}: return None (done) or "
                                "Observation([{'role': ..., 'content': ...}])")
    return observation


def run_episode(env: Environment, example: Example, policy_turns: list[str], max_turns: int,
                system_prompt: str | None = None) -> Episode:
    """Play one trajectory with the scripted `policy_turns`, at most `max_turns` of them."""
    env.reset(example)
    episode = Episode(messages=initial_messages(example, env, system_prompt))
    for turn_text in policy_turns:
        if episode.turns >= max_turns:
            break
        if not episode.take_turn(env, turn_text, max_turns):
            break
    return episode


def step_all(envs: list[Environment], conversations: list[list[dict]], turn_texts: list[str],
             max_workers: int | None = None) -> list[Observation | None]:
    """`checked_step` for many trajectories at once, concurrently: one slow tool call holds up no other."""
    if not (len(envs) == len(conversations) == len(turn_texts)):
        raise ValueError("step_all needs one conversation and one turn per environment")
    if len(envs) <= 1:
        return [checked_step(*args) for args in zip(envs, conversations, turn_texts)]
    with ThreadPoolExecutor(max_workers=max_workers or min(len(envs), 32)) as pool:
        return list(pool.map(checked_step, envs, conversations, turn_texts))
