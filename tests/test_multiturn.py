"""Multi-turn rollouts: batched trajectories resumed from their own KV caches, masks that train the
model's tokens only, log-probs that match one-sequence scoring, rewards on the last turn, the CLI."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

from grpo_mlx.cli import cli
from grpo_mlx.core.config import build_config, EvalConfig
from grpo_mlx.data.examples import Example
from grpo_mlx.envs.environments import environment_factory, text_between_turns
from grpo_mlx.core.errors import UserError
from grpo_mlx.train.gradients import make_loss_fn, policy_logprobs, prompt_groups
from grpo_mlx.model.logprobs import token_logprobs
from grpo_mlx.rollout.multiturn import generate_multiturn_rollout
from grpo_mlx.model.policy import attach_adapters, load_model
from grpo_mlx.rewards import get_reward
from grpo_mlx.rollout.batch import Rollout, make_sampler, pad_batch
from grpo_mlx.train.sampling import turn_reward_columns

ENV = f"{Path(__file__).parent / 'plugin_envs.py'}:AlwaysAnswer"
EXAMPLES = [Example(prompt="What is 12 times 34?", answer="408"), Example(prompt="What is 5 times 6? Think.", answer="30")]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    return model, tokenizer


def always_answer_rollout(policy, temperature=1.0, max_turns=3, max_tokens=5, **kwargs):
    model, tokenizer = policy
    mx.random.seed(4)
    return generate_multiturn_rollout(model, tokenizer, EXAMPLES, 2, max_tokens, make_sampler(temperature),
                                      make_env=environment_factory(ENV, [], tokenizer), max_turns=max_turns, **kwargs)


def segments(tokens, mask):
    """Runs of equal mask values: [(mask value, tokens), ...]."""
    runs = []
    for token, m in zip(tokens, mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(token)
        else:
            runs.append((m, [token]))
    return runs


def test_every_trajectory_runs_its_turns_with_observations_between(policy):
    _, tokenizer = policy
    rollout = always_answer_rollout(policy)
    eos = set(tokenizer.eos_token_ids)
    assert rollout.num_rows == 4 and rollout.turns == [3] * 4
    assert rollout.tool_calls == [3] * 4 and rollout.tool_errors == [2] * 4  # the last turn's answer counts too
    assert all(reason in ("turns", "length") for reason in rollout.finish_reasons)
    for row in range(4):
        messages, tokens, mask = rollout.messages[row], rollout.completion_tokens[row], rollout.completion_masks[row]
        assert [m["role"] for m in messages] == ["assistant", "user", "assistant", "user", "assistant"]
        assert [m["content"] for m in messages[1::2]] == ["observation 1: 42", "observation 2: 42"]
        assert len(mask) == len(tokens)
        runs = segments(tokens, mask)
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        assert all(len(turn) <= 5 for m, turn in runs if m == 1)  # --max-tokens bounds each turn
        # Each turn decodes to its message; each run of mask 0 is exactly what the template puts between turns.
        conversation = [{"role": "user", "content": EXAMPLES[row // 2].prompt}]
        for k, (m, run) in enumerate(runs):
            if m == 1:
                text = tokenizer.decode([t for t in run if t not in eos])
                assert text == messages[k]["content"]
                continue
            turn_text = messages[k - 1]["content"]
            between = text_between_turns(tokenizer, conversation, turn_text, _observation(messages[k]))
            stopped = runs[k - 1][1][-1] in eos
            expected = between[len("<|im_end|>"):] if stopped else between
            assert tokenizer.decode(run) == expected
            conversation += [messages[k - 1], messages[k]]
        assert rollout.final_turns[row] == messages[-1]["content"]


def _observation(message):
    from grpo_mlx.envs.environments import Observation

    return Observation([message])


def stopping_sampler(eos: int, every: int = 3):
    """Greedy, but every `every`-th decode step samples `eos` for every row: turns that end by a stop token."""
    calls = [0]

    def sample(logprobs):
        calls[0] += 1
        tokens = mx.argmax(logprobs, axis=-1)
        return mx.full(tokens.shape, eos, dtype=tokens.dtype) if calls[0] % every == 0 else tokens

    return sample


def test_turns_that_stop_resume_after_the_end_marker_the_model_wrote(policy):
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    rollout = generate_multiturn_rollout(model, tokenizer, EXAMPLES, 2, 8, stopping_sampler(eos),
                                         make_env=environment_factory(ENV, [], tokenizer), max_turns=3)
    assert rollout.finish_reasons == ["turns"] * 4 and rollout.turns == [3] * 4
    for tokens, mask, text in zip(rollout.completion_tokens, rollout.completion_masks, rollout.texts):
        runs = segments(tokens, mask)
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        # The model's <|im_end|> ends each turn (a target, mask 1); the template's text follows without another.
        assert all(run[-1] == eos for m, run in runs if m == 1)
        assert all(tokenizer.decode(run).startswith("\n<|im_start|>user\nobservation") for m, run in runs if m == 0)
        assert text.count("<|im_end|>") == 4 and not text.endswith("<|im_end|>")  # the final stop token left out


def scripted_sampler(tokens: list[int]):
    """Samples `tokens` in order, the same token for every row: all rows run the same script in lockstep
    (one sampler call per decode step of the whole batch)."""
    calls = [0]

    def sample(logprobs):
        token = tokens[min(calls[0], len(tokens) - 1)]
        calls[0] += 1
        return mx.full((logprobs.shape[0],), token, dtype=mx.uint32)

    return sample


@pytest.fixture(scope="module")
def qwen_like_policy(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template that renders tools Qwen2.5's way (the "json" tool format)."""
    import shutil

    from test_environments import QWEN_LIKE_TEMPLATE

    path = tmp_path_factory.mktemp("qwen_like") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_LIKE_TEMPLATE}))
    model, tokenizer, _ = load_model(str(path))
    return model, tokenizer


@pytest.mark.parametrize("fmt", ["fenced", "json"])
def test_a_calculator_call_is_answered_and_the_last_turn_is_scored(policy, qwen_like_policy, fmt):
    """A scripted policy calls the calculator, gets its result, then answers: the real ToolEnvironment end to end."""
    model, tokenizer = policy if fmt == "fenced" else qwen_like_policy
    make_env = environment_factory(None, ["calculator"], tokenizer)
    assert make_env().tool_format == fmt
    call = "```calc\n12*34\n```" if fmt == "fenced" else \
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
    eos = tokenizer.eos_token_id
    # The generator samples one token past a stop token before it hands the sequence back: a filler (eos).
    script = tokenizer.encode(call, add_special_tokens=False) + [eos, eos] + \
        tokenizer.encode("It is 408.", add_special_tokens=False) + [eos]
    rollout = generate_multiturn_rollout(model, tokenizer, EXAMPLES[:1], 2, 200, scripted_sampler(script),
                                         make_env=make_env, max_turns=3)
    observation = {"fenced": {"role": "user", "content": "```output\n408\n```"}, "json": {"role": "tool", "content": "408"}}
    assert rollout.messages[0] == [{"role": "assistant", "content": call}, observation[fmt],
                                   {"role": "assistant", "content": "It is 408."}]
    assert rollout.turns == [2, 2] and rollout.tool_calls == [1, 1] and rollout.tool_errors == [0, 0]
    assert rollout.finish_reasons == ["stop", "stop"] and rollout.final_turns == ["It is 408.", "It is 408."]
    # The prompt carries the tools (schemas or instructions); the tokens after it are the conversation as rendered.
    prompt_text = tokenizer.decode(rollout.prompt_tokens[0])
    assert ("calculator" in prompt_text) and (("<tools>" in prompt_text) == (fmt == "json"))
    messages = [{"role": "user", "content": EXAMPLES[0].prompt}, *rollout.messages[0]]
    kwargs = {"tools": make_env().tool_schemas} if fmt == "json" else {}
    if fmt == "fenced":
        messages.insert(0, {"role": "system", "content": make_env().system_prompt})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert prompt_text + tokenizer.decode(rollout.completion_tokens[0]) == rendered.rstrip("\n")
    rewards = get_reward("accuracy")(rollout.texts, ["408", "408"], **turn_reward_columns(rollout.final_turns, rollout.messages))
    assert rewards == [1.0, 1.0]


def test_the_trajectory_bound_stops_a_trajectory(policy):
    rollout = always_answer_rollout(policy, max_turns=4, max_tokens=5, max_trajectory_tokens=12)
    assert all(len(tokens) <= 12 for tokens in rollout.completion_tokens)
    assert all(t < 4 for t in rollout.turns) and set(rollout.finish_reasons) == {"length"}


def test_resumed_kv_caches_give_the_tokens_of_re_prefilling_the_transcript(policy):
    """Greedy: every model token is the argmax of one forward over the whole transcript before it."""
    model, _ = policy
    rollout = always_answer_rollout(policy, temperature=0.0, max_turns=3, max_tokens=4)
    for prompt, tokens, mask in zip(rollout.prompt_tokens, rollout.completion_tokens, rollout.completion_masks):
        sequence = mx.array(prompt + tokens)[None]
        logits = model(sequence[:, :-1])[0].astype(mx.float32)
        for i, (token, own) in enumerate(zip(tokens, mask)):
            if not own:
                continue
            row = logits[len(prompt) - 1 + i]
            best = int(mx.argmax(row).item())
            # Exact except for a near tie between two tokens (float rounding of two different paths).
            assert best == token or float(row[best] - row[token]) < 1e-4, (i, best, token)
        assert 0 in mask  # observations were prefilled into the resumed cache


def test_a_resumed_trajectory_prefills_only_its_new_tokens(policy, monkeypatch):
    """The generator's prefill sees each observation (less its last token, the first decode input), never a
    transcript again; the prompts were prefilled once per group before the decode."""
    import importlib

    gen = importlib.import_module("mlx_lm.generate")
    prefilled = []
    original = gen.PromptProcessingBatch.prompt

    def spy(self, tokens):
        prefilled.extend(len(t) for t in tokens)
        return original(self, tokens)

    monkeypatch.setattr(gen.PromptProcessingBatch, "prompt", spy)
    rollout = always_answer_rollout(policy)
    observations = [len(run) for tokens, mask in zip(rollout.completion_tokens, rollout.completion_masks)
                    for m, run in segments(tokens, mask) if m == 0]
    assert len(observations) == 8 and sum(prefilled) == sum(n - 1 for n in observations)


def test_multi_turn_logprobs_equal_one_sequence_scoring(policy):
    """The trainer's batched shared-prompt pass over padded rows scores each row as one plain sequence."""
    model, _ = policy
    rollout = always_answer_rollout(policy)
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, 32, None, rollout.completion_masks)
    groups = prompt_groups(rollout.prompt_tokens, slice(0, rollout.num_rows))
    batched = policy_logprobs(model, tokens, 0.7, groups=groups)
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_tokens, rollout.completion_tokens)):
        alone = token_logprobs(model, mx.array(prompt + completion)[None], 0.7)[0]
        scored = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        np.testing.assert_allclose(np.array(batched[i, scored]), np.array(alone[scored]), atol=1e-5)
    # The mask: the model's tokens only, each at its target position.
    assert float(mask.sum().item()) == sum(sum(m) for m in rollout.completion_masks)
    first = rollout.completion_masks[0]
    p = len(rollout.prompt_tokens[0])
    assert np.array(mask[0, p - 1 : p - 1 + len(first)]).tolist() == first


def test_observation_tokens_contribute_exactly_zero_gradient(tiny_model_dir, policy):
    """Old and reference log-probs at observation positions (mask 0) can be anything: the gradient is the same.
    The same change at a model token's position does change it."""
    model, _, _ = load_model(str(tiny_model_dir))
    attach_adapters(model, 4, -1, 20.0, 0.0, False)
    mx.random.seed(0)
    # LoRA B off zero, so the gradient reaches every adapter matrix.
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())]))
    rollout = always_answer_rollout(policy)
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, 32, None, rollout.completion_masks)
    config = build_config({}, {"model": str(tiny_model_dir), "beta": 0.1, "temperature": 1.0})
    loss_fn = make_loss_fn(config)
    advantages = mx.array([1.0, -1.0, 0.5, -0.5])
    current = mx.stop_gradient(token_logprobs(model, tokens))

    def grads(old, ref, completion_mask=mask):
        import mlx.nn as nn

        step = nn.value_and_grad(model, lambda m: loss_fn(m, tokens, completion_mask, advantages, old, ref, mx.array(50.0))[0])
        _, g = step(model)
        return {k: np.array(v) for k, v in tree_flatten(g)}

    baseline = grads(current - 0.1, current + 0.2)
    p = len(rollout.prompt_tokens[0])
    observation = np.zeros(mask.shape, dtype=bool)
    own = np.zeros(mask.shape, dtype=bool)
    for i, m in enumerate(rollout.completion_masks):
        start = len(rollout.prompt_tokens[i]) - 1
        observation[i, start : start + len(m)] = np.array(m) == 0
        own[i, start : start + len(m)] = np.array(m) == 1
    assert observation.any() and p > 0
    garbage = mx.where(mx.array(observation), 37.0, 0.0)
    moved = grads(current - 0.1 + garbage, current + 0.2 - garbage)
    for key in baseline:
        np.testing.assert_array_equal(moved[key], baseline[key], err_msg=key)
    # Were the observations targets (mask 1), the same change would move the gradient: the check can fail.
    every_token = mx.array(np.logical_or(observation, own).astype(np.float32))
    unmasked = grads(current - 0.1, current + 0.2, every_token)
    unmasked_moved = grads(current - 0.1 + garbage, current + 0.2 - garbage, every_token)
    assert any(not np.allclose(unmasked[k], unmasked_moved[k]) for k in unmasked)


def test_truncated_rows_leave_the_loss_whole_and_the_other_rows_keep_their_token_masks():
    tokens, mask = pad_batch([[1, 2], [1, 2]], [[3, 4, 5, 6], [3, 4, 5]], 0, 1, [False, True], [[1, 0, 0, 1], [1, 0, 1]])
    assert np.array(mask).tolist() == [[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert np.array(tokens).tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 0]]


def test_dynamic_sampling_keeps_each_rows_multi_turn_fields_with_it(policy):
    rollout = always_answer_rollout(policy)
    kept = Rollout.concatenate([rollout.select_groups([1]), rollout.select_groups([0])])
    order = [2, 3, 0, 1]
    for name in ("completion_tokens", "completion_masks", "messages", "final_turns", "turns", "tool_calls"):
        assert getattr(kept, name) == [getattr(rollout, name)[i] for i in order], name
    assert kept.tool_time == pytest.approx(2 * rollout.tool_time)
    assert kept.truncated == [rollout.truncated[i] for i in order]


def test_accuracy_reads_the_last_model_turn_not_a_tool_output():
    accuracy = get_reward("accuracy")
    transcript = "```calc\n12*34\n```<|im_end|>\n<|im_start|>user\n```output\n408\n```<|im_end|>\n<|im_start|>assistant\nDone."
    assert accuracy([transcript], ["408"]) == [1.0]  # the tool's number is the last one in the text
    columns = turn_reward_columns(["Done."], [[{"role": "assistant", "content": "```calc\n12*34\n```"},
                                              {"role": "user", "content": "```output\n408\n```"},
                                              {"role": "assistant", "content": "Done."}]])
    assert accuracy([transcript], ["408"], **columns) == [0.0]
    columns["final_turns"] = ["It is 408."]
    assert accuracy([transcript], ["408"], **columns) == [1.0]


def test_eval_scores_the_last_model_turn_not_a_tool_output(policy, monkeypatch):
    """The model has the calculator compute the gold answer, then ends with a turn that has no number:
    read from the whole trajectory, the tool's 408 would be its answer and score."""
    import grpo_mlx.rollout.batch as rollout_module
    from grpo_mlx.eval.evaluate import evaluate_examples

    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    script = tokenizer.encode("```calc\n12*34\n```", add_special_tokens=False) + [eos, eos] + \
        tokenizer.encode("Done.", add_special_tokens=False) + [eos]
    monkeypatch.setattr(rollout_module, "make_sampler", lambda *args, **kwargs: scripted_sampler(script))
    turns = {"make_env": environment_factory(None, ["calculator"], tokenizer), "max_turns": 3}
    result = evaluate_examples(model, tokenizer, EXAMPLES[:1], samples=2, max_tokens=200, turns=turns)
    record, = result["examples"]
    assert record["messages"][1]["content"] == "```output\n408\n```" and record["messages"][2]["content"] == "Done."
    assert record["gold_answer"] == "408" and record["completion"].rstrip().endswith("Done.")
    assert record["extracted"] is None and record["correct"] is False and result["accuracy"] == 0.0
    assert record["sample_answers"] == [None, None] and result["pass@2"] == 0.0 and result["maj@2"] == 0.0


def test_a_conversational_reward_gets_the_trajectorys_messages():
    from grpo_mlx.rewards import score_completions

    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append(completions)
        return [1.0] * len(completions)

    messages = [{"role": "assistant", "content": "a"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]
    score_completions({"r": reward}, {}, ["a...b"], [None], prompts=[[{"role": "user", "content": "q"}]],
                      **turn_reward_columns(["b"], [messages]))
    assert seen == [[messages]]


def test_train_with_calculator_writes_the_turn_and_tool_metrics(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", "multiplication", "--tools", "calculator",
            "--max-turns", "2", "--steps", "1", "--batch-size", "2", "--group-size", "2", "--max-tokens", "6",
            "--output", str(run_dir)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("turns/mean", "tools/calls_per_trajectory", "tools/errors", "time/tools"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 1 <= metrics["turns/mean"] <= 2
    sample = json.loads((run_dir / "completions.jsonl").read_text().splitlines()[0])
    assert sample["trajectories"] and sample["trajectories"][0][0]["role"] == "assistant"


def test_dr_grpo_divides_multi_turn_rows_by_the_trajectory_bound(tiny_model_dir, tmp_path, monkeypatch):
    """Dr. GRPO's constant is N x the longest completion allowed; a multi-turn row's completion is its
    trajectory, bounded by --max-trajectory-tokens, not by --max-tokens (one turn). mu = 1, beta = 0:
    ratio 1, so the loss is -sum_i A_i * (row i's model tokens) / (N * bound), in float64 here."""
    import grpo_mlx.train.trainer as trainer
    from test_grpo import ref_advantages

    bound = 150
    reward = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
    config = build_config({}, dict(model=str(tiny_model_dir), dataset="arithmetic", env=ENV, max_turns=3, max_tokens=4,
                                   max_trajectory_tokens=bound, steps=1, batch_size=2, group_size=4, loss_type="dr_grpo",
                                   beta=0.0, reward=[reward], lora_rank=4, lora_layers=-1, seed=3,
                                   output=str(tmp_path / "run")))
    seen, real_update_policy = [], trainer.update_policy

    def recording_update_policy(run, rollout, rewards, applicable, tokens, completion_mask, normaliser):
        seen.append((list(rewards), np.array(completion_mask, dtype=np.float64), normaliser))
        return real_update_policy(run, rollout, rewards, applicable, tokens, completion_mask, normaliser)

    monkeypatch.setattr(trainer, "update_policy", recording_update_policy)
    run = trainer.setup(config)
    eos = run.tokenizer.eos_token_id

    def sometimes_stopping(sample):  # turns of different lengths, or sum_i A_i * length_i is 0
        return lambda logprobs: mx.where(mx.random.uniform(shape=(logprobs.shape[0],)) < 0.3, eos, sample(logprobs))

    run.multiturn_fn = lambda model, tokenizer, examples, G, max_tokens, sampler, **kwargs: generate_multiturn_rollout(
        model, tokenizer, examples, G, max_tokens, sometimes_stopping(sampler), **kwargs)
    (metrics, _), = list(trainer.train(run))
    (rewards, mask, normaliser), = seen
    lengths = mask.sum(axis=1)
    assert lengths.max() > config.max_tokens  # rows longer than one turn: the case tells the two bounds apart
    assert normaliser == pytest.approx(1.0 / (len(rewards) * bound), rel=1e-12)
    expected = -(ref_advantages(rewards, 4) * lengths).sum() / (len(rewards) * bound)
    assert abs(expected) > 1e-3 and metrics["loss"] == pytest.approx(expected, rel=1e-4)


def test_train_on_an_environment_plugin_trains_the_model_tokens_only(tiny_model_dir, tmp_path):
    """Every trajectory runs 3 turns; mu = 2 and micro-batches of 3 rows take the masked rows."""
    run_dir = tmp_path / "run"
    reward = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", "arithmetic", "--env", ENV, "--max-turns", "3",
            "--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-tokens", "4", "--reward", reward,
            "--num-iterations", "2", "--micro-batch-size", "3", "--loss-type", "dr_grpo", "--output", str(run_dir)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["turns/mean"] for m in lines] == [3.0, 3.0]
    assert all(m["tools/calls_per_trajectory"] == 3.0 and m["tools/errors"] == pytest.approx(2 / 3) for m in lines)
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in lines)


def test_eval_with_tools_runs_the_environment(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--dataset", "multiplication", "--tools", "calculator",
            "--max-turns", "2", "--limit", "3", "--max-tokens", "6", "--samples", "2", "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert "turns/mean" in saved and "tools/calls_per_trajectory" in saved and "pass@2" in saved
    assert saved["settings"]["tools"] == ["calculator"] and saved["settings"]["max_turns"] == 2
    assert all(record["messages"][0]["role"] == "assistant" and record["turns"] >= 1 for record in saved["examples"])


def test_eval_on_an_environment_plugin_counts_its_turns(tiny_model_dir):
    from grpo_mlx.eval.evaluate import evaluate

    result = evaluate(build_config({}, {"model": str(tiny_model_dir), "dataset": "multiplication", "env": ENV,
                                        "max_turns": 2, "limit": 2, "max_tokens": 3}, EvalConfig))
    assert result["turns/mean"] == 2.0 and result["tools/calls_per_trajectory"] == 2.0
    assert [m["role"] for m in result["examples"][0]["messages"]] == ["assistant", "user", "assistant"]


@pytest.mark.parametrize("flags, message", [
    ({"tools": "calc"}, "unknown tool 'calc'"),
    ({"max_turns": 3}, "only applies to multi-turn rollouts"),
    ({"max_trajectory_tokens": 100}, "only applies to multi-turn rollouts"),
    ({"tools": "calculator", "max_tokens": 16, "max_trajectory_tokens": 8}, "at least --max-tokens (16)"),
    ({"env": "my_env.py"}, "path/to/file.py:Class"),
])
def test_bad_multi_turn_options_are_one_line_errors(flags, message):
    for kind in (None, EvalConfig):
        with pytest.raises(UserError) as info:
            build_config({}, flags, kind) if kind else build_config({}, flags)
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_two_ranks_train_multi_turn_and_report_the_global_turn_metrics(tiny_model_dir, tmp_path):
    from test_distributed import BIN, launch

    run_dir = tmp_path / "run"
    reward = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
    launch([str(BIN / "grpo-mlx"), "train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "2",
            "--batch-size", "2", "--group-size", "2", "--max-tokens", "4", "--reward", reward, "--env", ENV,
            "--max-turns", "2", "--seed", "1"], cwd=tmp_path)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["turns/mean"] == 2.0 and m["tools/calls_per_trajectory"] == 2.0 and m["grad_norm"] > 0 for m in lines)


TURN_METRICS = {"turns/mean": 1.75, "tools/calls_per_trajectory": 0.625, "tools/errors": 0.2, "time/tools": 0.0123}
TRAJECTORY_SAMPLE = {
    "step": 5, "prompt": "What is 347 times 2816?", "answer": "977152", "rewards": [1.0, 0.0],
    "completions": ["```calc\n347*2816\n```<|im_end|>\n<|im_start|>user\n```output\n977152\n```...", "About 900000."],
    "trajectories": [
        [{"role": "assistant", "content": "```calc\n347*2816\n```"}, {"role": "user", "content": "```output\n977152\n```"},
         {"role": "assistant", "content": "It is 977152."}],
        [{"role": "assistant", "content": "About 900000."}],
    ],
}


def test_dashboard_shows_turn_and_tool_metrics_and_the_trajectory_turn_by_turn():
    from grpo_mlx.ui.dashboard import Dashboard
    from test_dashboard import recording_console, screen_text, scripted_metrics, table_value

    plain = Dashboard(total_steps=10, console=recording_console(), plain=False)
    plain.update(scripted_metrics(2)[-1])
    assert "tools" not in screen_text(plain)  # single-turn runs: no tools section
    dashboard = Dashboard(total_steps=500, console=recording_console(width=80), plain=False)
    for m in scripted_metrics(300):
        dashboard.update({**m, **TURN_METRICS})
    dashboard.show_sample(TRAJECTORY_SAMPLE)
    screen = screen_text(dashboard)
    assert table_value(screen, "turns") == "1.75" and table_value(screen, "call errors") == "20%", screen
    assert "calls/traj" in screen and "in tools" in screen
    assert "assistant: ```calc 347*2816 ```" in screen and "user: ```output 977152 ```" in screen
    assert "assistant: It is 977152." in screen
    lines = screen.splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, screen
