"""Bounds on input: prompts too long for the model, data sets without the answers the rewards need."""

import json
from pathlib import Path

import numpy as np
import pytest

from grpo_mlx.core.config import build_config
from grpo_mlx.data.examples import Example, arithmetic_examples
from grpo_mlx.data.prompts import render_prompt
from grpo_mlx.core.errors import UserError
from grpo_mlx.train.trainer import setup, train

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
HUGE = 2_000_000  # characters: one such line once grew the process to 24 GB


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def normal_rows(n: int) -> list[dict]:
    return [{"question": ex.prompt, "answer": ex.answer} for ex in arithmetic_examples(n, seed=4)]


def small_config(model_dir, tmp_path, dataset, **overrides):
    values = dict(model=str(model_dir), dataset=str(dataset), steps=1, batch_size=2, group_size=2, max_tokens=4,
                  lora_rank=4, lora_layers=1, output=str(tmp_path / "run"), reward=[TEXT_REWARD], beta=0.0)
    values.update(overrides)
    return build_config({}, values)


# ---------------------------------------------------------------- training


def test_a_2mb_prompt_is_skipped_and_counted_and_training_runs(tiny_model_dir, tmp_path):
    rows = normal_rows(6)
    rows.insert(3, {"question": "word " * (HUGE // 5), "answer": "1"})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    messages = []
    run = setup(small_config(tiny_model_dir, tmp_path, data, steps=4), log=messages.append)
    # The tiny model's context is 2048 positions; 4 of them are for the completion.
    assert "skipped 1 prompts longer than 2044 tokens" in messages, messages
    assert len(run.examples) == 6 and all(len(ex.prompt) < 100 for ex in run.examples)
    steps = list(train(run))  # 4 steps of 2 prompts: every kept prompt is drawn
    assert len(steps) == 4 and all(np.isfinite(m["loss"]) for m, _ in steps)


def test_every_prompt_too_long_is_refused_in_one_line_before_training(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "huge.jsonl", [{"question": "x" * HUGE, "answer": "1"}] * 2)
    with pytest.raises(UserError, match=r"every prompt of .*huge\.jsonl \(2\) is longer than 2044 tokens") as error:
        setup(small_config(tiny_model_dir, tmp_path, data))
    assert "\n" not in str(error.value)


def test_max_prompt_length_skips_longer_prompts(tiny_model_dir, tmp_path):
    rows = normal_rows(3) + [{"question": "How many apples are left if Sam eats three of twelve? " * 4, "answer": "9"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    messages = []
    # A value from a config file or the command line arrives as text.
    run = setup(small_config(tiny_model_dir, tmp_path, data, max_prompt_length="60"), log=messages.append)
    assert run.config.max_prompt_length == 60 and run.prompt_limit == 60
    assert "skipped 1 prompts longer than 60 tokens" in messages, messages
    assert [ex.answer for ex in run.examples] == [r["answer"] for r in rows[:3]]
    with pytest.raises(UserError, match="every prompt .* longer than 5 tokens"):
        setup(small_config(tiny_model_dir, tmp_path, data, max_prompt_length=5))
    with pytest.raises(UserError, match="--max-prompt-length 0: must be at least 1"):
        setup(small_config(tiny_model_dir, tmp_path, data, max_prompt_length=0))


def test_max_tokens_beyond_the_context_is_refused(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", normal_rows(2))
    with pytest.raises(UserError, match="--max-tokens 2048 leaves no room for a prompt in the model's context of 2048"):
        setup(small_config(tiny_model_dir, tmp_path, data, max_tokens=2048))


def test_the_limit_is_exact_in_tokens_at_the_boundary(tiny_model_dir):
    from grpo_mlx.data.prompts import drop_long_prompts
    from grpo_mlx.model.policy import load_model

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    example = Example(prompt="Tom has 12 apples and gives away 5 of them to his friend. " * 3, answer="7")
    length = len(render_prompt(tokenizer, example))
    assert len(example.prompt.encode()) * 2 > length  # too long to keep unmeasured: it is tokenized
    assert drop_long_prompts(tokenizer, [example], None, length, "d") == ([example], 0)
    with pytest.raises(UserError, match=f"longer than {length - 1} tokens"):
        drop_long_prompts(tokenizer, [example], None, length - 1, "d")


def test_rendered_prompts_are_checked_again_before_rolling_out():
    from grpo_mlx.data.prompts import check_prompt_lengths

    check_prompt_lengths([[1] * 10, [1] * 12], 12)
    with pytest.raises(UserError, match="rendered to 13 tokens, more than the limit of 12"):
        check_prompt_lengths([[1] * 10, [1] * 13], 12)


# ---------------------------------------------------------------- answers the rewards need


def test_answer_rewards_on_data_without_answers_are_refused_before_the_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a haiku."}, {"prompt": "Name a colour."}])
    no_model = tmp_path / "no-model"  # never reached: the refusal comes first
    for rewards in (["accuracy"], ["accuracy", "cosine", "length"]):
        config = build_config({}, dict(model=str(no_model), dataset=str(data), reward=rewards))
        with pytest.raises(UserError, match=r"no example of .*prompts\.jsonl has a gold answer.*--answer-field") as error:
            setup(config)
        assert "\n" not in str(error.value)


def test_an_answer_reward_beside_others_on_data_without_answers_warns(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a haiku."}, {"prompt": "Name a colour."}])
    config = build_config({}, dict(model=str(tmp_path / "no-model"), dataset=str(data), reward=["accuracy", "format"]))
    messages = []
    with pytest.raises(UserError, match="model .*no-model.* not found"):  # got past the answer check
        setup(config, log=messages.append)
    assert any("2 of 2 examples have no gold answer; accuracy does not apply" in m for m in messages), messages


def test_built_in_rewards_say_whether_they_need_answers():
    from grpo_mlx.rewards import get_reward

    needing = {name for name in ("accuracy", "length", "cosine", "format", "tag_count", "overlong")
               if getattr(get_reward(name), "needs_answer", False)}
    assert needing == {"accuracy", "length", "cosine"}


# ---------------------------------------------------------------- evaluation


def test_eval_skips_and_counts_prompts_longer_than_the_context(tmp_path):
    from grpo_mlx.core.config import EvalConfig
    from grpo_mlx.eval.evaluate import evaluate, summary_table

    rows = normal_rows(3)
    rows.insert(1, {"question": "What is the sum of all these numbers? " + "12 plus 34 " * 300, "answer": "1"})
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    result = evaluate(EvalConfig(dataset=str(data), max_tokens=8))  # the demo model: 256 positions, 248 for the prompt
    assert result["skipped_long_prompts"] == 1 and result["num_examples"] == 3
    assert [r["gold"] for r in result["examples"]] == [r["answer"] for r in (rows[0], rows[2], rows[3])]
    assert result["settings"]["max_prompt_length"] == 248

    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(summary_table(result))
    assert "over 248 tokens" in console.export_text()


def test_eval_refuses_when_every_prompt_is_too_long(tmp_path):
    from grpo_mlx.core.config import EvalConfig
    from grpo_mlx.eval.evaluate import evaluate

    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "x" * HUGE, "answer": "1"}])
    with pytest.raises(UserError, match="every prompt .* longer than 248 tokens"):
        evaluate(EvalConfig(dataset=str(data), max_tokens=8))
