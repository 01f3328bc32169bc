"""The tool demo's embedded model (grpo_mlx/demo_tools_model) and the harness that measures it.

The demo's premise: the warm-started model calls the calculator only sometimes, and
the trajectories that call it are right far more often than the ones that answer from
memory, so GRPO has both a tool-use rate and an accuracy to raise.
"""

import pytest
from mlx_lm import load

from grpo_mlx.model import tiny_model
from grpo_mlx.core.config import DEMO_TOOLS_PRESET
from grpo_mlx.data.examples import HELD_OUT_SEED_OFFSET, multiplication_examples
from grpo_mlx.envs.environments import FENCED_FORMAT, ToolEnvironment, run_episode
from grpo_mlx.core.errors import UserError
from grpo_mlx.eval.demo import tool_episode_accuracy, tool_episodes
from grpo_mlx.model.tiny_model import demo_model_path, render_chat
from grpo_mlx.envs.tools import CALCULATOR

# The multiplication test split (seed 0), what `grpo-mlx eval` measures; the warm start never saw it.
HELDOUT = multiplication_examples(64, seed=HELD_OUT_SEED_OFFSET)


@pytest.fixture(scope="module")
def tools_demo():
    return load(str(demo_model_path(tools=True)))


@pytest.fixture(scope="module")
def greedy_episodes(tools_demo):
    model, tokenizer = tools_demo
    return tool_episodes(model, tokenizer, HELDOUT, max_turns=DEMO_TOOLS_PRESET["max_turns"],
                         max_tokens=DEMO_TOOLS_PRESET["max_tokens"])


def test_tools_demo_is_its_own_model_and_loads_offline(tools_demo):
    model, tokenizer = tools_demo
    assert demo_model_path(tools=True) != demo_model_path()
    assert model.args.model_type == "qwen2"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_missing_tools_demo_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "DEMO_TOOLS_MODEL_DIR", tmp_path)
    with pytest.raises(UserError, match="build_demo_model.py --tools"):
        demo_model_path(tools=True)


def test_render_chat_is_what_the_template_renders(tools_demo):
    """The warm start is built with render_chat; the trainer renders with the chat template."""
    _, tokenizer = tools_demo
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    messages = run_episode(env, HELDOUT[0], ["```calc\n1 * 2\n```", "2"], max_turns=3).messages
    assert len(messages) == 5
    for end in (2, 4):
        assert tokenizer.apply_chat_template(messages[:end], add_generation_prompt=True, tokenize=False) \
            == render_chat(messages[:end], add_generation_prompt=True)


def test_tool_system_prompt_tokenizes_compactly(tools_demo):
    _, tokenizer = tools_demo
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    ids = tokenizer.encode(env.system_prompt, add_special_tokens=False)
    assert len(ids) < 100  # byte-level on an untrained vocabulary it would be ~250
    call = tokenizer.encode("```calc\n347 * 2816\n```", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in call if tokenizer.decode([i]).isdigit()] == list("3472816")


def test_harness_plays_the_same_conversation_as_run_episode(greedy_episodes):
    """Replaying the model's turns through the reference driver gives the same messages."""
    for example, episode in zip(HELDOUT[:16], greedy_episodes):
        turns = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
        reference = run_episode(env, example, turns, max_turns=DEMO_TOOLS_PRESET["max_turns"])
        assert reference.messages == episode.messages
        assert (reference.done, reference.tool_calls) == (episode.done, episode.tool_calls)


def test_demo_calls_the_tool_sometimes_and_the_tool_pays(tools_demo):
    model, tokenizer = tools_demo
    result = tool_episode_accuracy(model, tokenizer, HELDOUT, max_turns=DEMO_TOOLS_PRESET["max_turns"],
                                   max_tokens=DEMO_TOOLS_PRESET["max_tokens"])
    assert result["episodes"] == len(HELDOUT)
    assert 0 < result["tool_rate"] < 1
    assert 0 < result["episodes_with_tool"] < len(HELDOUT)
    assert result["accuracy_with_tool"] > result["accuracy_without_tool"] + 0.3
    assert result["accuracy"] < 0.6  # room for GRPO to raise it
