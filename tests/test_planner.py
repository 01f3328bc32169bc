"""The memory planner: choosing micro-batches and checkpointing for a budget, refusing before the model
loads, `grpo-mlx plan`, and steps at a real model's shape (1 layer) staying under their budget."""

import re
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from grpo_mlx.memory import planner

from grpo_mlx.train import trainer
from grpo_mlx.cli import cli
from grpo_mlx.core.config import build_config
from grpo_mlx.core.errors import UserError
from grpo_mlx.train.gradients import micro_batches
from grpo_mlx.memory.estimate import StepShape, estimate_step
from grpo_mlx.memory.planner import GB, choose_plan, model_shape, plan_training, read_model_config
from grpo_mlx.rollout.batch import Rollout
from grpo_mlx.model.shapes import shape_config
from test_reliability import run_main

# Sum of character codes: differs between the fixed completions below, which are all as long.
CHAR_CODES = f"{Path(__file__).parent / 'plugin_rewards.py'}:char_codes"


@pytest.fixture(autouse=True)
def keep_mlx_memory_limit():
    """setup() holds MLX to the plan's budget for the whole process: restore it after each test."""
    original = mx.set_memory_limit(0)
    mx.set_memory_limit(original)
    yield
    mx.set_memory_limit(original)


@pytest.fixture(scope="module")
def qwen_1_layer(tmp_path_factory):
    """Qwen2.5-0.5B's exact shape (151,936-token vocabulary), one layer, random float32 weights."""
    from grpo_mlx.model.shapes import make_shape_model

    return make_shape_model(tmp_path_factory.mktemp("shape") / "qwen2.5-0.5b-1layer", "qwen2.5-0.5b", num_layers=1)


# ---------------------------------------------------------------- choose_plan with a fake estimate


WEIGHTS = 1000


def budget_for(peak: int) -> int:
    """The smallest budget whose usable share (less PLAN_HEADROOM) holds `peak`."""
    budget = int(peak / (1 - planner.PLAN_HEADROOM))
    while planner.usable(budget) < peak:
        budget += 1
    return budget


def fake_estimate(model, step: StepShape) -> dict:
    """Peak = weights (a quarter at 4 bits) + 100 per row of a micro-batch (40 when checkpointed) + a logits
    term that a chunk halves; the rollout costs 10 per row of the whole batch."""
    weights = WEIGHTS if model.bits is None else WEIGHTS * model.bits // 16
    per_row = 40 if step.grad_checkpoint else 100
    logits = 20 * step.micro_batch_size // (2 if step.logits_chunk else 1)
    policy = weights + per_row * step.micro_batch_size + logits
    rollout = weights + 10 * step.batch_size * step.group_size
    return dict(weights=weights, adapters=0, rollout=rollout, reference=weights, policy=policy,
                peak=max(policy, rollout))


MODEL = model_shape({"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True})
STEP = StepShape(batch_size=4, group_size=8, prompt_tokens=100, max_tokens=512, micro_batch_size=1)


def test_everything_fitting_takes_the_leanest_plan_within_the_cost_slack_of_the_fastest(monkeypatch):
    # The fastest runs the whole batch at once; 8 rows (4 micro-batches) cost 1.5% more by plan_cost and
    # peak lower; 4 rows would cut groups, and chunks of 64 positions cost 4% more on top.
    plan = choose_plan(MODEL, STEP, budget=10**6, estimate=fake_estimate)
    assert (plan.micro_batch_size, plan.grad_checkpoint, plan.logits_chunk) == (8, False, None)
    fastest = planner.plan_cost(replace(STEP, micro_batch_size=32))
    assert fastest < planner.plan_cost(plan.step) <= fastest * (1 + planner.PLAN_COST_SLACK)
    monkeypatch.setattr(planner, "PLAN_COST_SLACK", 0.0)  # no slack: the fastest, the whole batch at once
    plan = choose_plan(MODEL, STEP, budget=10**6, estimate=fake_estimate)
    assert (plan.micro_batch_size, plan.grad_checkpoint, plan.logits_chunk) == (32, False, None)


def test_prefers_whole_groups_and_no_checkpointing_when_both_fit():
    # 8 rows (one group) fit without checkpointing (1960), 16 only with it (1000 + 16*40 + 320 = 1960).
    plan = choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 8 * 120), estimate=fake_estimate)
    assert (plan.micro_batch_size, plan.grad_checkpoint) == (8, False)
    # A budget where 8 rows no longer fit: one group still fits checkpointed, which beats cutting the group.
    plan = choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 8 * 60), estimate=fake_estimate)
    assert plan.micro_batch_size % STEP.group_size == 0 and plan.grad_checkpoint
    assert plan.peak <= WEIGHTS + 8 * 60


def test_a_plan_predicted_within_the_headroom_of_the_budget_is_not_taken():
    # The estimate has run ~10% under measured peaks: a plan predicted at 95% of the budget could exceed it.
    needed = fake_estimate(MODEL, replace(STEP, micro_batch_size=8))["peak"]  # one group, the leanest unchunked
    budget = int(needed / 0.95)
    plan = choose_plan(MODEL, STEP, budget=budget, estimate=fake_estimate)
    assert plan.peak <= planner.usable(budget) < needed
    assert planner.usable(budget) == int(budget * 0.9)


def test_cuts_a_group_only_when_one_group_does_not_fit():
    # 8 rows take at least 1400 (checkpointed, chunked logits); 3 or 4 rows fit 1350.
    plan = choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 350), estimate=fake_estimate)
    assert plan.micro_batch_size in (3, 4) and plan.peak <= WEIGHTS + 350
    assert planner.micro_batch_candidates(4, 8) == [32, 16, 8, 4, 3, 2, 1]


def test_respects_a_fixed_micro_batch_size_and_checkpointing():
    plan = choose_plan(MODEL, STEP, budget=10**6, micro_batch_size=4, estimate=fake_estimate)
    assert plan.micro_batch_size == 4 and not plan.grad_checkpoint
    plan = choose_plan(MODEL, STEP, budget=10**6, grad_checkpoint=True, estimate=fake_estimate)
    assert plan.grad_checkpoint and plan.micro_batch_size == 8  # whole groups, the leanest within the slack
    # Only checkpointing would fit 8 rows, and --no-grad-checkpoint forbids it: a smaller micro-batch.
    plan = choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 8 * 60), grad_checkpoint=False, estimate=fake_estimate)
    assert not plan.grad_checkpoint and plan.micro_batch_size < 8


def test_refusal_names_the_fixed_choices_that_keep_it_from_fitting():
    with pytest.raises(UserError) as e:
        choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 8 * 60), micro_batch_size=8, grad_checkpoint=False,
                    estimate=fake_estimate)
    message = str(e.value)
    assert "\n" not in message and "without --micro-batch-size" in message
    # Even the smallest plan's rollout (1320) is over: fewer rows or a 4-bit model, each checked to fit.
    with pytest.raises(UserError) as e:
        choose_plan(MODEL, STEP, budget=budget_for(WEIGHTS + 200), estimate=fake_estimate)
    fixes = str(e.value).split("any one of: ")[1]
    assert fixes == "--group-size 5, --batch-size 2, a 4-bit model (--quantize)", fixes  # the largest that fit
    for fixed in (replace(STEP, group_size=5), replace(STEP, batch_size=2)):
        choose_plan(MODEL, fixed, budget=budget_for(WEIGHTS + 200), estimate=fake_estimate)
    choose_plan(replace(MODEL, bits=4), STEP, budget=budget_for(WEIGHTS + 200), estimate=fake_estimate)


# ---------------------------------------------------------------- refusing before the model loads


def train_config(model_dir, tmp_path, **overrides):
    values = dict(model=str(model_dir), dataset="arithmetic", steps=1, batch_size=1, group_size=4, max_tokens=8,
                  lora_rank=4, lora_layers=1, beta=0.0, seed=3, reward=[CHAR_CODES], output=str(tmp_path / "run"),
                  learning_rate=0.5)
    values.update(overrides)
    return build_config({}, values)


def arithmetic_prompt_range(model_dir) -> tuple[int, int]:
    """The shortest and longest prompt setup() plans with for the arithmetic task on this model's tokenizer."""
    from grpo_mlx.data.examples import load_examples_with_stats
    from grpo_mlx.model.policy import load_config_and_tokenizer
    from grpo_mlx.data.prompts import prompt_token_range

    _, tokenizer = load_config_and_tokenizer(str(model_dir))
    return prompt_token_range(tokenizer, load_examples_with_stats("arithmetic", split="train", seed=3)[0], None)


def test_refuses_before_the_model_loads_and_names_a_fix_the_planner_accepts(qwen_1_layer, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("the model loaded"))
    config = train_config(qwen_1_layer, tmp_path, batch_size=2, max_tokens=1024)
    model_config = read_model_config(str(qwen_1_layer))
    shortest, prompt = arithmetic_prompt_range(qwen_1_layer)
    # A budget where 128 completion tokens fit with some plan, 1024 do not.
    step = planner.train_step_shape(replace(config, max_tokens=128), prompt, 2, shortest_prompt=shortest)
    budget = budget_for(planner.smallest_plan(model_shape(model_config), step)[1]["peak"])
    args = ["train", "--model", str(qwen_1_layer), "--batch-size", "2", "--group-size", "4", "--max-tokens", "1024",
            "--beta", "0", "--lora-rank", "4", "--lora-layers", "1", "--memory-limit", repr(budget / GB), "--output", str(tmp_path / "run"),
            "--reward", CHAR_CODES]
    assert run_main(args) == 2 and not loads
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: this step needs at least") and "\n" not in message, message
    assert not (tmp_path / "run" / "config.yaml").exists()
    fix = int(re.search(r"--max-tokens (\d+)", message).group(1))
    assert 128 <= fix < 1024
    config = replace(config, memory_limit=budget / GB)
    assert plan_training(replace(config, max_tokens=fix), model_config, prompt, 2,
                         shortest_prompt=shortest).peak <= planner.usable(budget)
    with pytest.raises(UserError):  # the largest that fits: one more token does not
        plan_training(replace(config, max_tokens=fix + 1), model_config, prompt, 2, shortest_prompt=shortest)


def test_the_plan_holds_when_the_shortest_prompt_meets_the_longest(qwen_1_layer, tmp_path, monkeypatch):
    # A micro-batch's completion call runs from its shortest prompt's end to the batch's longest row: planned for
    # the longest prompt alone, SmolLM2's step (GSM8K prompts of 133-160 tokens) measured 24% over its prediction.
    from grpo_mlx.data.prompts import render_prompt
    from grpo_mlx.model.policy import load_config_and_tokenizer

    class Planned(Exception):
        pass

    def stop_at_the_load(*args, **kwargs):
        raise Planned

    data = tmp_path / "spread.jsonl"
    questions = ["What is 2 plus 3?", "Add up the following numbers and give the total: " + " + ".join(["7"] * 60)]
    data.write_text("".join(f'{{"prompt": "{q}", "answer": "1"}}\n' for q in questions))
    config = train_config(qwen_1_layer, tmp_path, dataset=str(data), batch_size=2, max_tokens=32)
    plans = []
    monkeypatch.setattr(trainer, "load_model", stop_at_the_load)  # the plan comes before the model loads
    monkeypatch.setattr(trainer, "plan_training", lambda *a, **k: plans.append(plan_training(*a, **k)) or plans[-1])
    with pytest.raises(Planned):
        trainer.setup(config)
    _, tokenizer = load_config_and_tokenizer(str(qwen_1_layer))
    examples = trainer.load_data(config, {}, lambda msg: None)
    lengths = sorted(len(render_prompt(tokenizer, ex, None)) for ex in examples)
    step = plans[0].step
    assert (step.shortest_prompt, step.prompt_tokens) == (lengths[0], lengths[-1]) and lengths[-1] - lengths[0] > 100
    # The spread costs memory: the same plan for the longest prompt alone predicts less.
    model = model_shape(read_model_config(str(qwen_1_layer)))
    assert estimate_step(model, step)["peak"] > estimate_step(model, replace(step, shortest_prompt=None))["peak"]


# ---------------------------------------------------------------- steps at a real shape, under a forced budget


def fixed_rollout(length):
    """Completions of `length` tokens, the same whatever the policy: constrained and unconstrained runs train
    on the same batch, and every row is as long as the plan assumed."""
    def rollout_fn(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
        rows = [list(p) for p in prompts for _ in range(group_size)]
        completions = [[40 + (7 * i + 3 * j) % 200 for j in range(length)] for i in range(len(rows))]
        return Rollout(rows, completions, [tokenizer.decode(c) for c in completions], ["length"] * len(rows),
                       group_size)

    return rollout_fn


def one_step(config, length):
    """(plan, adapters after one SGD step, the step's metrics, log) on fixed completions. The run is
    dropped before returning: mx.get_peak_memory counts every live array, a former run's weights too."""
    messages = []
    run = trainer.setup(config, log=messages.append)
    run.rollout_fn = fixed_rollout(length)
    run.optimizer = optim.SGD(learning_rate=config.learning_rate)  # see test_train_options.train_fixed
    (metrics, _), = list(trainer.train(run))
    return run.plan, {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}, metrics, messages


@pytest.mark.slow
def test_a_forced_small_budget_splits_the_step_and_trains_the_same_adapters(qwen_1_layer, tmp_path, monkeypatch):
    seen, accumulate = [], trainer.accumulate_gradients
    monkeypatch.setattr(trainer, "accumulate_gradients",
                        lambda step, tokens, *rest: seen.append(rest[4]) or accumulate(step, tokens, *rest))
    config = train_config(qwen_1_layer, tmp_path)
    free, free_adapters, _, _ = one_step(replace(config, output=str(tmp_path / "free")), 8)
    assert free.micro_batch_size == 4 and not free.grad_checkpoint  # the default: one micro-batch
    # A budget the default plan would exceed: halfway between it and the smallest plan.
    model = model_shape(read_model_config(str(qwen_1_layer)))
    step = free.step
    whole = estimate_step(model, replace(step, micro_batch_size=4))["peak"]
    least = planner.smallest_plan(model, step)[1]["peak"]
    budget = budget_for((whole + least) // 2)
    tight, tight_adapters, metrics, messages = one_step(replace(config, memory_limit=budget / GB,
                                                                output=str(tmp_path / "tight")), 8)
    assert tight.micro_batch_size < 4 or tight.grad_checkpoint
    sizes = [[b.stop - b.start for b in batches] for batches in seen]  # the micro-batches the step ran
    assert sizes == [[4], [b.stop - b.start for b in micro_batches(4, tight.micro_batch_size)]]
    assert any(m.startswith("memory plan (--memory-limit") for m in messages)
    assert metrics["peak_memory_gb"] * GB <= budget, (metrics["peak_memory_gb"], budget / GB)
    assert free_adapters.keys() == tight_adapters.keys()
    for k in free_adapters:
        np.testing.assert_allclose(tight_adapters[k], free_adapters[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in tight_adapters.items() if k.endswith("lora_b"))  # it trained


@pytest.mark.slow
def test_512_completion_tokens_train_within_the_budget(qwen_1_layer, tmp_path):
    config = train_config(qwen_1_layer, tmp_path, group_size=2, max_tokens=512)
    model = model_shape(read_model_config(str(qwen_1_layer)))
    shortest, longest = arithmetic_prompt_range(qwen_1_layer)
    step = planner.train_step_shape(config, longest, 1, shortest_prompt=shortest)
    # Under the default plan's peak (both rows at once, all logits at once): the planner must cut it.
    budget = estimate_step(model, replace(step, micro_batch_size=2))["peak"] * 0.8
    plan, _, metrics, _ = one_step(replace(config, memory_limit=budget / GB), 512)
    assert plan.micro_batch_size == 1 or plan.grad_checkpoint or plan.logits_chunk
    assert metrics["completions/mean_length"] == 512
    assert metrics["peak_memory_gb"] * GB <= budget, (metrics["peak_memory_gb"], budget / GB)


# ---------------------------------------------------------------- grpo-mlx plan


def plan_output(*args):
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 0, result.output
    return result.output


def predicted(output, phase):
    return float(re.search(rf"{phase}\s+([\d.]+) GB", output).group(1))


def test_plan_for_a_shape_name_prints_the_phases_the_plan_and_the_fits_table():
    output = plan_output("--model", "qwen2.5-1.5b", "--bits", "4", "--max-tokens", "512", "--memory-limit", "10")
    shape = model_shape({**shape_config("qwen2.5-1.5b"), "torch_dtype": "bfloat16"}, 4)
    plan_line = re.search(r"plan: micro-batch (\d+) of 32 rows.*checkpointing (on|off)", output)
    step = StepShape(batch_size=4, group_size=8, prompt_tokens=200, max_tokens=512,
                     micro_batch_size=int(plan_line.group(1)), grad_checkpoint=plan_line.group(2) == "on",
                     logits_chunk=None)
    chunk = re.search(r"logits in chunks of (\d+) positions", output.split("\n")[3])
    step = replace(step, logits_chunk=int(chunk.group(1)) if chunk else None)
    phases = estimate_step(shape, step)
    for key, label in (("weights", "weights"), ("policy", "policy pass peak"), ("peak", "step peak")):
        assert predicted(output, label) == pytest.approx(phases[key] / GB, abs=0.006), label
    assert phases["peak"] <= 10 * GB
    table = output[output.index("What fits"):].splitlines()
    assert table[1].split()[:2] == ["B", "8"] and len(table) == 2 + 8  # header, then B = 1..8


def test_plan_for_a_local_model_directory_and_its_one_line_errors(qwen_1_layer, capsys):
    output = plan_output("--model", str(qwen_1_layer), "--batch-size", "2", "--group-size", "4", "--max-tokens", "64",
                         "--prompt-tokens", "50", "--micro-batch-size", "4", "--no-grad-checkpoint")
    shape = model_shape(read_model_config(str(qwen_1_layer)))
    assert "1 layers" in output and "32-bit floats" in output
    assert "micro-batch 4 of 8 rows" in output and "checkpointing off" in output
    step = StepShape(batch_size=2, group_size=4, prompt_tokens=50, max_tokens=64, micro_batch_size=4)
    assert predicted(output, "step peak") == pytest.approx(estimate_step(shape, step)["peak"] / GB, abs=0.006)
    for args, words in ((["--model", "no/such-model"], "not in the Hugging Face cache"),
                        (["--model", "qwen9"], "known shape name"),
                        (["--model", "qwen2.5-1.5b", "--memory-limit", "0"], "memory_limit"),
                        (["--model", str(qwen_1_layer), "--max-tokens", "999999", "--memory-limit", "1"],
                         None)):
        code = run_main(["plan", *args])
        err = capsys.readouterr()
        if words is None:  # nothing fits: the report says so, with the smallest plan's phases
            assert code == 0 and "plan: none fits: this step needs at least" in err.out
        else:
            assert code == 2 and err.err.startswith("error: ") and words in err.err and err.err.count("\n") == 1


def test_the_plan_is_recorded_in_config_yaml_as_a_comment_only(trained_run_dir):
    from grpo_mlx.core.config import load_config_file

    text = (trained_run_dir / "config.yaml").read_text()
    assert re.search(r"\n# memory_plan: micro-batch 8 of 8 rows .* predicted peak [\d.]+ GB of a [\d.]+ GB budget\n", text)
    # Reused as --config it replays the settings, not the plan: unset choices stay the planner's.
    config = build_config(load_config_file(trained_run_dir / "config.yaml"))
    assert config.micro_batch_size is None and config.grad_checkpoint is None and config.memory_limit is None


def test_plan_reads_a_hub_id_from_the_cache_without_the_network(qwen_1_layer, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--qwen-1layer" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(qwen_1_layer / "config.json", snapshot / "config.json")  # the config alone: no weights needed
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = plan_output("--model", "someone/qwen-1layer", "--max-tokens", "64")
    local = plan_output("--model", str(qwen_1_layer), "--max-tokens", "64")
    assert from_cache.split("\n", 1)[1] == local.split("\n", 1)[1]  # all but the model's name
