"""Input validation and the training-step rules that keep bad values out of a run.

Settings: every field's type, finiteness and range is checked before anything loads,
with one `error:` line. Training: warm-up trains from the first step, dynamic sampling
keeps groups by the advantages' own rule, a reward plug-in calling sys.exit() is a
reward failure, and a non-finite update is undone.
"""

import json
import typing

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import grpo_mlx.train.sampling as sampling
import grpo_mlx.train.trainer as trainer
from grpo_mlx.train.checkpoint import load_latest_checkpoint
from grpo_mlx.cli import main
from grpo_mlx.core.config import FIELD_TYPES_OF, TrainConfig, build_config
from grpo_mlx.core.errors import UserError
from grpo_mlx.train.grpo import group_advantages, informative_groups
from test_reliability import TEXT_REWARD, run_main

FIELD_TYPES = FIELD_TYPES_OF[TrainConfig]


# Appended to CLI runs that must fail: if a value were wrongly accepted, the run stays short.
SHORT = ["--steps", "1", "--batch-size", "2", "--max-tokens", "2"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def trainable(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


# ---------------------------------------------------------------- settings


FLOAT_FIELDS = [name for name, hint in FIELD_TYPES.items() if float in typing.get_args(hint) or hint is float]


def test_float_fields_are_found():
    assert {"learning_rate", "temperature", "beta", "lora_scale", "epsilon", "epsilon_high", "max_grad_norm",
            "top_p", "min_p", "weight_decay", "lora_dropout"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_for_every_float_field(name, value):
    with pytest.raises(UserError, match=rf"{name}=.*finite"):
        build_config({}, {name: value})


def test_non_finite_reward_weights_are_refused():
    with pytest.raises(UserError, match=r"reward_weights=.*finite"):
        build_config({}, {"reward": "accuracy,format", "reward_weights": "1,nan"})


def test_nan_learning_rate_on_the_command_line_is_one_error_line(capsys, tmp_path):
    assert run_main(["train", "--learning-rate", "nan", "--output", str(tmp_path / "run"), *SHORT]) == 2
    assert "learning_rate=nan" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(FIELD_TYPES))
def test_every_field_refuses_a_value_of_the_wrong_type(name):
    with pytest.raises(UserError, match=rf"invalid config value {name}=.*must be"):
        build_config({name: {"a": 1}})  # a mapping is no field's type


@pytest.mark.parametrize("text,key,expected", [
    ("reward: 5", "reward", "a list of strings"),
    ("system_prompt: 5", "system_prompt", "a string"),
    ("steps: .inf", "steps", "an integer"),
    ("steps: 10.5", "steps", "an integer"),
    ("dataset: [a, b]", "dataset", "a string"),
    ("quantize: maybe", "quantize", "true or false"),
    ("reward_weights: [1, x]", "reward_weights", "a list of numbers"),
])
def test_config_file_values_of_the_wrong_type_are_one_error_line(text, key, expected, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text + "\n" + ("" if key == "steps" else "steps: 1\n"))
    assert run_main(["train", "--config", str(path), "--output", str(tmp_path / "run"), *SHORT[2:]]) == 2
    line = one_error_line(capsys)
    assert f"{key}=" in line and expected in line


def test_config_file_values_still_convert_where_unambiguous():
    config = build_config({"steps": "1e3", "beta": 0, "quantize": "yes", "reward_weights": [1],
                           "epsilon_high": "0.28", "micro_batch_size": 4.0})
    assert (config.steps, config.beta, config.quantize, config.reward_weights) == (1000, 0.0, True, [1.0])
    assert (config.epsilon_high, config.micro_batch_size) == (0.28, 4)


@pytest.mark.parametrize("flags,field,expected", [
    (["--sample-every", "0"], "sample_every", ">= 1"),
    (["--save-every", "0"], "save_every", ">= 1"),
    (["--keep-checkpoints", "0"], "keep_checkpoints", ">= 1"),
    (["--min-p", "2"], "min_p", "in [0, 1]"),
    (["--lora-dropout", "1.5"], "lora_dropout", "in [0, 1)"),
    (["--lora-dropout", "1"], "lora_dropout", "in [0, 1)"),
    (["--top-k", "-1"], "top_k", ">= 0"),
    (["--max-sampling-rounds", "-1"], "max_sampling_rounds", ">= 0"),
    (["--warmup-steps", "-1"], "warmup_steps", ">= 0"),
    (["--weight-decay", "-0.1"], "weight_decay", ">= 0"),
    (["--seed", "-1"], "seed", "in [0, "),
    (["--output", ""], "output", "must not be empty"),
])
def test_out_of_range_flags_are_one_error_line(flags, field, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an accepted empty --output would write here
    args = ["train", *flags, *SHORT] + ([] if field == "output" else ["--output", str(tmp_path / "run")])
    assert run_main(args) == 2
    line = one_error_line(capsys)
    assert f"{field}=" in line and expected in line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("field,value,choices", [
    ("q_bits", "7", "2, 3, 4, 5, 6, 8"),
    ("q_group_size", "16", "32, 64, 128"),
    ("loss_type", "ppo", "grpo, bnpo, dr_grpo, dapo"),
    ("kl_estimator", "k9", "k1, k2, k3"),
])
def test_a_value_outside_a_fields_choices_is_one_error_line(field, value, choices, tmp_path, capsys):
    flag = "--" + field.replace("_", "-")
    # On the command line the option is a click Choice ...
    assert run_main(["train", flag, value, *SHORT, "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert f"'{flag}'" in line and f"'{value}' is not one of" in line
    # ... and a config file's value goes through validate(), which reads the same choices.
    path = tmp_path / "config.yaml"
    path.write_text(f"{field}: {value}\n")
    assert run_main(["train", "--config", str(path), *SHORT, "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert f"{field}=" in line and f"one of {choices}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "fuse", "rewards", "report"])
def test_every_command_takes_debug(command, capsys):
    assert run_main([command, "--debug", "--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def test_debug_is_an_option_not_a_word_anywhere_on_the_command_line(capsys):
    # "--debug" given as the value of --system-prompt does not turn tracebacks on.
    assert run_main(["eval", "--system-prompt", "--debug", "--samples", "0"]) == 2
    assert "samples=0" in one_error_line(capsys)
    with pytest.raises(UserError, match="samples=0"):
        main(["eval", "--samples", "0", "--debug"])


# ---------------------------------------------------------------- warm-up


def tiny_config(tmp_path, **values):
    base = dict(model=None, output=str(tmp_path / "run"), steps=2, batch_size=2, group_size=4, max_tokens=4,
                learning_rate=0.02, reward=[TEXT_REWARD], seed=5, beta=0.0)
    return build_config({}, {**base, **values})


@pytest.mark.parametrize("mu", [1, 2])
def test_warmup_rises_linearly_from_the_first_step(mu, tmp_path):
    config = tiny_config(tmp_path, learning_rate=0.3, warmup_steps=3, num_iterations=mu)
    optimizer = trainer.make_optimizer(config)
    layer = nn.Linear(2, 2)
    used = []
    for _ in range(5 * mu):
        optimizer.update(layer, {"weight": mx.ones((2, 2)), "bias": mx.ones(2)})
        used.append(float(np.array(optimizer.learning_rate)))  # the rate this update used
    per_step = used[::mu]
    np.testing.assert_allclose(per_step, [0.1, 0.2, 0.3, 0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(used, np.repeat(per_step, mu), rtol=1e-6)  # mu updates of one step share it


def test_first_warmup_step_changes_the_adapters(tiny_model_dir, tmp_path):
    config = tiny_config(tmp_path, model=str(tiny_model_dir), steps=1, warmup_steps=10)
    run = trainer.setup(config)
    before = trainable(run.model)
    (metrics, _), = list(trainer.train(run))
    assert metrics["skipped_update"] == 0.0
    assert metrics["learning_rate"] == pytest.approx(0.002)
    after = trainable(run.model)
    assert any(not np.array_equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------- dynamic sampling


def test_a_group_is_informative_only_if_its_applicable_rewards_differ():
    rewards = [1, 1, 1, 0,  1, 0, 1, 1,  5, 0, 0, 0,  2, 2, 2, 2]
    applicable = [1, 1, 1, 0,  1, 1, 1, 1,  1, 0, 0, 0,  1, 1, 1, 1]
    assert np.array(informative_groups(rewards, 4, applicable)).tolist() == [False, True, False, False]
    assert np.array(informative_groups(rewards, 4)).tolist() == [True, True, True, False]
    # group_advantages follows the same rule: zero exactly where a group is not informative
    advantages = np.array(group_advantages(mx.array(rewards, dtype=mx.float32), 4, applicable=mx.array(applicable))).reshape(4, 4)
    assert (np.abs(advantages).sum(axis=1) > 0).tolist() == [False, True, False, False]


def test_dynamic_sampling_drops_a_group_whose_applicable_rows_are_equal(tiny_model_dir, tmp_path):
    # Every group: three rows score 1, the last row gets None (the reward does not apply),
    # which the combined reward scores 0. Over its applicable rows the group is constant.
    plugin = tmp_path / "partial.py"
    plugin.write_text("def partial(completions, answers, group_size, **fields):\n"
                      "    return [None if i % group_size == group_size - 1 else 1.0 for i in range(len(completions))]\n")
    config = tiny_config(tmp_path, model=str(tiny_model_dir), steps=1, reward=[f"{plugin}:partial"],
                         dynamic_sampling=True, max_sampling_rounds=1)
    run = trainer.setup(config)
    rollout, examples, rewards, valid, _, timing = sampling.sample_groups(run, 1)
    assert timing["sampling_rounds"] == 2 and examples == [] and rollout.num_rows == 0
    (metrics, _), = list(trainer.train(run))
    assert metrics["skipped_update"] == 1.0


# ---------------------------------------------------------------- a reward plug-in calling sys.exit()


def test_reward_plugin_calling_sys_exit_is_a_reward_failure_and_the_last_step_is_saved(tiny_model_dir, tmp_path, capsys):
    plugin = tmp_path / "quitter.py"
    # Calls: 1 is the trial before training, 2 is step 1, 3 is step 2.
    plugin.write_text("import sys\n"
                      "calls = []\n"
                      "def quitter(completions, answers, **fields):\n"
                      "    calls.append(1)\n"
                      "    if len(calls) >= 3:\n"
                      "        sys.exit(0)\n"
                      "    return [len(c) / 10 for c in completions]\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "4", "--batch-size", "2",
            "--group-size", "4", "--max-tokens", "4", "--reward", f"{plugin}:quitter", "--save-every", "10"]
    assert run_main(args) == 2
    line = one_error_line(capsys)
    assert "quitter" in line and "sys.exit(0)" in line and "step 2" in line and "saved step 1" in line
    state = load_latest_checkpoint(out)[2]
    assert state["step"] == 1
    assert (out / "checkpoints" / "step-000001" / "adapters.safetensors").is_file()


# ---------------------------------------------------------------- non-finite updates


def overflowing_optimizer_after(good_updates, monkeypatch):
    """AdamW whose learning rate overflows float32 (inf) after `good_updates` updates:
    the loss and gradient stay finite, the update makes the adapters non-finite."""
    def make(config):
        return optim.AdamW(learning_rate=lambda update: mx.where(update < good_updates, config.learning_rate, 1e39),
                           weight_decay=config.weight_decay)

    monkeypatch.setattr(trainer, "make_optimizer", make)


def test_a_non_finite_update_is_undone_and_counted_as_a_bad_step(tiny_model_dir, tmp_path, monkeypatch):
    overflowing_optimizer_after(1, monkeypatch)
    run = trainer.setup(tiny_config(tmp_path, model=str(tiny_model_dir), steps=3))
    seen = []
    for metrics, _ in trainer.train(run):
        seen.append((metrics, trainable(run.model)))
    assert [m["skipped_update"] for m, _ in seen] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(m["loss"]) for m, _ in seen)  # the loss was fine: the update was not
    for k, good in seen[0][1].items():
        np.testing.assert_array_equal(seen[2][1][k], good)
    assert run.bad_steps == 2
    assert int(np.array(run.optimizer.state["step"])) == 1  # the undone updates left the optimizer as it was


def test_stopping_on_non_finite_updates_keeps_the_last_finite_adapters(tiny_model_dir, tmp_path, monkeypatch, capsys):
    overflowing_optimizer_after(1, monkeypatch)  # step 1 trains, every later update overflows
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", "12", "--batch-size", "2",
            "--group-size", "4", "--max-tokens", "4", "--learning-rate", "0.02", "--reward", TEXT_REWARD,
            "--save-every", "1", "--keep-checkpoints", "12", "--seed", "5"]
    assert run_main(args) == 2
    assert f"{trainer.MAX_BAD_STEPS} steps in a row" in one_error_line(capsys)
    saved = {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}
    step_1 = {k: np.array(v) for k, v in mx.load(str(out / "checkpoints" / "step-000001" / "adapters.safetensors")).items()}
    assert all(np.isfinite(v).all() for v in saved.values())
    assert saved.keys() == step_1.keys()
    for k in step_1:
        np.testing.assert_array_equal(saved[k], step_1[k])
    assert any(np.abs(v).sum() > 0 for k, v in step_1.items() if "lora_b" in k)  # step 1 did train
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_update"] for m in metrics] == [0.0] + [1.0] * (trainer.MAX_BAD_STEPS - 1)
