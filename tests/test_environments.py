"""Environments: the interface on a scripted policy, the tool-call formats, plug-ins, the multiplication task."""

import time

import pytest

from grpo_mlx.data.examples import Example, load_examples, multiplication_examples
from grpo_mlx.envs.environments import (
    FENCED_FORMAT,
    JSON_FORMAT,
    Environment,
    EnvironmentFailed,
    Observation,
    ToolEnvironment,
    environment_factory,
    load_environment,
    parse_tool_calls,
    run_episode,
    step_all,
    supports_tools,
    text_between_turns,
    tool_format,
)
from grpo_mlx.core.errors import UserError
from grpo_mlx.rewards import get_reward
from grpo_mlx.model.tiny_model import CHAT_TEMPLATE
from grpo_mlx.envs.tools import CALCULATOR

# Qwen2.5's template cut to what matters here: tool schemas in the system turn, <tool_call>
# instructions, "tool" messages as <tool_response> blocks inside one user turn.
QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tokenizer(chat_template):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return make_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return make_tokenizer(QWEN_LIKE_TEMPLATE)


QUESTION = Example(prompt="What is 347 times 2816?", answer="977152")
CALC_TURN = "I will use the calculator.\n```calc\n347 * 2816\n```"
JSON_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 2816"}}\n</tool_call>'


# ---------------------------------------------------------------- the interface on a scripted policy

def test_the_base_environment_is_single_turn():
    episode = run_episode(Environment(), QUESTION, ["977152", "never played"], max_turns=5)
    assert episode.done and episode.turns == 1
    assert episode.messages == [{"role": "user", "content": QUESTION.prompt}, {"role": "assistant", "content": "977152"}]
    assert (episode.tool_calls, episode.tool_errors) == (0, 0)


def test_a_calculator_call_is_answered_and_a_turn_without_a_call_ends_the_trajectory():
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    episode = run_episode(env, QUESTION, [CALC_TURN, "The answer is 977152.", "never played"], max_turns=4,
                          system_prompt="Be brief.")
    assert episode.done and episode.turns == 2 and (episode.tool_calls, episode.tool_errors) == (1, 0)
    system, *rest = episode.messages
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\nYou can use tools.")
    assert "```calc\n347 * 2816\n```" in system["content"]  # the instructions show the format
    assert rest == [
        {"role": "user", "content": QUESTION.prompt},
        {"role": "assistant", "content": CALC_TURN},
        {"role": "user", "content": "```output\n977152\n```"},
        {"role": "assistant", "content": "The answer is 977152."},
    ]


def test_max_turns_bounds_the_trajectory_and_the_last_observation_is_not_appended():
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    episode = run_episode(env, QUESTION, [CALC_TURN] * 10, max_turns=3)
    assert not episode.done and episode.turns == 3
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                     "assistant"]
    assert episode.tool_calls == 3  # the third call ran, but no turn follows its answer


def test_a_policy_that_stops_early_leaves_the_trajectory_not_done():
    episode = run_episode(ToolEnvironment([CALCULATOR]), QUESTION, [CALC_TURN], max_turns=5)
    assert not episode.done and episode.turns == 1


def test_tool_errors_are_observations_and_counted():
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    turn = "```calc\n1 / 0\n```\nand\n```calc\nx + 1\n```"
    episode = run_episode(env, QUESTION, [turn, "done"], max_turns=3)
    assert (episode.tool_calls, episode.tool_errors) == (2, 2)
    observation = episode.messages[3]["content"]
    assert observation == ("```output\nError: division by zero\n```\n```output\nError: the name 'x' is not "
                           "allowed; use numbers, + - * / // % ** and parentheses\n```")


def test_at_most_max_calls_per_turn_run():
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT, max_calls_per_turn=2)
    observation = env.step([], "".join(f"```calc\n{i} * 2\n```\n" for i in range(3)))
    assert observation.messages[0]["content"].split("```output\n")[1:] == [
        "0\n```\n", "2\n```\n", "Error: not run: at most 2 tool calls per turn\n```"]
    assert (observation.tool_calls, observation.tool_errors) == (3, 1)


class Countdown(Environment):
    """Answers "again" until it has seen `rounds` turns; records what it was given."""

    def __init__(self, rounds=2):
        self.rounds = rounds

    def reset(self, example):
        self.example, self.seen = example, []

    def step(self, messages, turn_text):
        self.seen.append((len(messages), turn_text))
        if len(self.seen) >= self.rounds:
            return None
        return Observation([{"role": "user", "content": f"again {len(self.seen)}"}])


def test_step_gets_the_conversation_before_the_turn_and_the_turn():
    env = Countdown(rounds=3)
    episode = run_episode(env, QUESTION, ["a", "b", "c", "d"], max_turns=5)
    assert env.example is QUESTION and episode.done and episode.turns == 3
    assert env.seen == [(1, "a"), (3, "b"), (5, "c")]
    assert [m["content"] for m in episode.messages] == [QUESTION.prompt, "a", "again 1", "b", "again 2", "c"]


def test_step_all_runs_environments_concurrently():
    class Slow(Environment):
        def step(self, messages, turn_text):
            time.sleep(0.5)
            return Observation([{"role": "user", "content": turn_text.upper()}])

    started = time.perf_counter()
    observations = step_all([Slow() for _ in range(4)], [[]] * 4, ["a", "b", "c", "d"])
    assert time.perf_counter() - started < 1.5  # 2 s one after another
    assert [o.messages[0]["content"] for o in observations] == ["A", "B", "C", "D"]


def test_a_failing_or_malformed_environment_is_named():
    class Broken(Environment):
        def step(self, messages, turn_text):
            raise KeyError("gold")

    class Wrong(Environment):
        def step(self, messages, turn_text):
            return "an observation"

    with pytest.raises(EnvironmentFailed, match=r"Broken failed on turn 'hi' \(KeyError: 'gold'\)"):
        run_episode(Broken(), QUESTION, ["hi"], max_turns=2)
    with pytest.raises(EnvironmentFailed, match="Wrong answered str: return None"):
        step_all([Wrong(), Wrong()], [[], []], ["a", "b"])


# ---------------------------------------------------------------- formats

def test_template_support_for_tools_is_detected(tiny_tokenizer, qwen_tokenizer):
    assert not supports_tools(tiny_tokenizer) and tool_format(tiny_tokenizer) == FENCED_FORMAT
    assert supports_tools(qwen_tokenizer) and tool_format(qwen_tokenizer) == JSON_FORMAT
    assert tool_format(None) == FENCED_FORMAT
    assert tool_format(make_tokenizer(None)) == FENCED_FORMAT


def test_json_calls_are_answered_with_tool_messages(qwen_tokenizer):
    factory = environment_factory(None, ["calculator"], qwen_tokenizer)
    env = factory()
    assert env.tool_format == JSON_FORMAT and env.system_prompt is None
    assert env.tool_schemas[0]["function"]["name"] == "calculator"
    episode = run_episode(env, QUESTION, [JSON_CALL + "\n" + JSON_CALL.replace("347 * 2816", "2 ** 5"), "977152"],
                          max_turns=3)
    assert episode.messages == [  # no system message: the template shows the tools
        {"role": "user", "content": QUESTION.prompt},
        {"role": "assistant", "content": episode.messages[1]["content"]},
        {"role": "tool", "content": "977152"},
        {"role": "tool", "content": "32"},
        {"role": "assistant", "content": "977152"},
    ]


@pytest.mark.parametrize("turn, expected", [
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}', "6"),  # stopped at </tool_call>
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2 * 3\\"}"}</tool_call>', "6"),
    ('<tool_call>{"name": "calculator", "parameters": {"expression": "2 * 3"}}</tool_call>', "6"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "2 *</tool_call>', "Error: the tool call is not valid JSON"),
    ('<tool_call>["calculator"]</tool_call>', 'Error: a tool call is {"name"'),
    ('<tool_call>{"name": "abacus", "arguments": {}}</tool_call>', "Error: there is no tool 'abacus' (tools: calculator)"),
    ('<tool_call>{"name": "calculator", "arguments": {"code": "1"}}</tool_call>', "Error: calculator takes one text argument"),
])
def test_json_calls_malformed_or_cut_off(turn, expected):
    observation = ToolEnvironment([CALCULATOR], JSON_FORMAT).step([], turn)
    assert observation.messages[0]["content"].startswith(expected)
    assert observation.tool_errors == (0 if expected == "6" else 1)


def test_fenced_blocks_of_other_languages_are_text_and_json_tags_are_not_fenced_calls():
    tools = [CALCULATOR]
    assert parse_tool_calls("```python\nprint(1)\n```", FENCED_FORMAT, tools) == []  # python tool not enabled
    assert parse_tool_calls("```output\n5\n```", FENCED_FORMAT, tools) == []
    assert parse_tool_calls(JSON_CALL, FENCED_FORMAT, tools) == []
    assert parse_tool_calls(CALC_TURN, JSON_FORMAT, tools) == []
    calls = parse_tool_calls("```CALC \n2+2", FENCED_FORMAT, tools)  # cut off before the closing fence
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "2+2"})]


def test_text_between_turns_is_what_the_template_adds(tiny_tokenizer, qwen_tokenizer):
    messages = [{"role": "user", "content": "Q"}]
    fenced = Observation([{"role": "user", "content": "```output\n6\n```"}])
    assert text_between_turns(tiny_tokenizer, messages, "```calc\n2*3\n```", fenced) == (
        "<|im_end|>\n<|im_start|>user\n```output\n6\n```<|im_end|>\n<|im_start|>assistant\n")
    env = ToolEnvironment([CALCULATOR], JSON_FORMAT)
    observation = env.step(messages, JSON_CALL)
    assert text_between_turns(qwen_tokenizer, messages, JSON_CALL, observation, env.tool_schemas) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n977152\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_rewrites_earlier_turns_cannot_be_resumed():
    hides_old_turns = ("{%- for m in messages %}{{ '<' + m.role + '>' + (m.content if loop.last else '...') }}"
                       "{%- endfor %}{%- if add_generation_prompt %}<assistant>{%- endif %}")
    with pytest.raises(UserError, match="renders earlier turns differently"):
        text_between_turns(make_tokenizer(hides_old_turns), [{"role": "user", "content": "Q"}], "A",
                           Observation([{"role": "user", "content": "B"}]))


# ---------------------------------------------------------------- plug-ins and the factory

PLUGIN = """
from grpo_mlx.envs.environments import Environment, Observation


class Echo(Environment):
    system_prompt = "Say stop to stop."

    def __init__(self, tools=(), tool_format="fenced"):
        self.tool_names = [t.name for t in tools]
        self.tool_format = tool_format

    def step(self, messages, turn_text):
        return None if "stop" in turn_text else Observation([{"role": "user", "content": "echo: " + turn_text}])


class NoTools(Environment):
    pass


def not_a_class():
    pass
"""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text(PLUGIN)
    return path


def test_plugin_environment_by_file(plugin_file, tiny_tokenizer):
    env = environment_factory(f"{plugin_file}:Echo", ["calculator"], tiny_tokenizer)()
    assert (env.tool_names, env.tool_format) == (["calculator"], FENCED_FORMAT)
    episode = run_episode(env, QUESTION, ["hello", "stop now"], max_turns=4)
    assert episode.done and [m["content"] for m in episode.messages] == [
        "Say stop to stop.", QUESTION.prompt, "hello", "echo: hello", "stop now"]


def test_plugin_environment_by_module(tmp_path, monkeypatch, qwen_tokenizer):
    (tmp_path / "grpo_test_env_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = environment_factory("grpo_test_env_mod:Echo", [], qwen_tokenizer)()
    assert (env.tool_names, env.tool_format) == ([], JSON_FORMAT)
    assert load_environment("grpo_test_env_mod:NoTools")().step([], "x") is None


@pytest.mark.parametrize("spec, message", [
    ("my_env.py", "environment plug-in 'my_env.py': write it as path/to/file.py:Class"),
    ("{plugin}:Missing", "has no 'Missing' \\(environments there: Echo, NoTools\\)"),
    ("{plugin}:not_a_class", "not_a_class is a function, not a subclass of grpo_mlx.environments.Environment"),
    ("no/such/file.py:Echo", "file no/such/file.py not found; give the path of a .py file, e.g. my_env.py:MyEnvironment"),
    ("grpo_no_such_module_xyz:Echo", "cannot import module 'grpo_no_such_module_xyz'"),
])
def test_bad_environment_plugins_are_one_line_user_errors(spec, message, plugin_file):
    with pytest.raises(UserError, match=message) as caught:
        environment_factory(spec.format(plugin=plugin_file))
    assert "\n" not in str(caught.value)


def test_plugin_without_a_tools_parameter_refuses_tools(plugin_file):
    with pytest.raises(UserError, match="takes no tools: drop --tools"):
        environment_factory(f"{plugin_file}:NoTools", ["calculator"])


def test_plugin_whose_constructor_fails_is_refused_before_training(tmp_path):
    path = tmp_path / "needy.py"
    path.write_text("from grpo_mlx.envs.environments import Environment\n"
                    "class Needy(Environment):\n    def __init__(self, data):\n        self.data = data\n")
    with pytest.raises(UserError, match="creating it failed \\(TypeError"):
        environment_factory(f"{path}:Needy")


def test_factory_without_env_or_tools_is_single_turn_and_unknown_tools_are_refused(tiny_tokenizer):
    assert type(environment_factory(None, [], tiny_tokenizer)()) is Environment
    env = environment_factory(None, ["calculator"], tiny_tokenizer)()
    assert isinstance(env, ToolEnvironment) and env.tool_format == FENCED_FORMAT and env.tool_schemas == []
    with pytest.raises(UserError, match="unknown tool 'shell'"):
        environment_factory(None, ["shell"], tiny_tokenizer)


# ---------------------------------------------------------------- the multiplication task

def test_multiplication_examples_are_seeded_and_correct():
    examples = multiplication_examples(200, seed=3)
    assert examples == multiplication_examples(200, seed=3)
    assert examples != multiplication_examples(200, seed=4)
    for example in examples:
        a, b = example.meta["a"], example.meta["b"]
        assert 100 <= a <= 999 and 1000 <= b <= 9999
        assert example.prompt == f"What is {a} times {b}?" and example.answer == str(a * b)


def test_multiplication_is_a_built_in_task_with_held_out_splits_scored_by_accuracy():
    train = load_examples("multiplication", split="train", limit=50)
    test = load_examples("multiplication", split="test", limit=50)
    assert len(train) == len(test) == 50
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    accuracy = get_reward("accuracy")
    answers = [e.answer for e in test[:2]]
    assert accuracy([f"The product is {answers[0]}.", "It is 12."], answers) == [1.0, 0.0]
