"""TrainConfig: defaults, file + flag merging, validation that names the field."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from grpo_mlx.cli import cli, main
from grpo_mlx.core.config import DEMO_PRESET, SHARED, EvalConfig, GenerateConfig, TrainConfig, build_config, load_config_file
from grpo_mlx.core.errors import UserError


def test_defaults_follow_deepseekmath():
    c = TrainConfig()
    assert (c.group_size, c.epsilon, c.beta, c.num_iterations) == (8, 0.2, 0.04, 1)
    assert 1e-6 <= c.learning_rate <= 1e-4


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: some/model\ngroup_size: 4\nbeta: 0.1\nreward: accuracy,format\n")
    config = build_config(load_config_file(path), {"beta": 0.0, "group_size": None})
    assert config.model == "some/model" and config.group_size == 4 and config.beta == 0.0
    assert config.reward == ["accuracy", "format"]
    assert config.steps == TrainConfig().steps  # no demo preset once a model is named


def test_json_config_files_load(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "m", "loss-type": "dapo", "epsilon_high": 0.28}))
    config = build_config(load_config_file(path))
    assert config.loss_type == "dapo" and config.epsilon_high == 0.28


def test_no_model_applies_the_demo_preset_under_explicit_flags():
    config = build_config({}, {"steps": 5})
    assert config.model is None and config.steps == 5
    assert config.max_tokens == DEMO_PRESET["max_tokens"]


@pytest.mark.parametrize(
    "values,field",
    [
        ({"group_size": 1}, "group_size"),
        ({"beta": -0.1}, "beta"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"kl_estimator": "k9"}, "kl_estimator"),
        ({"temperature": 0}, "temperature"),
        ({"reward": "accuracy,format", "reward_weights": "1.0"}, "reward_weights"),
        ({"steps": "many"}, "steps"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(values, field):
    with pytest.raises(UserError, match=field):
        build_config({}, values)


def test_cli_help_and_version_read_well():
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "grpo-mlx" in result.output
    result = runner.invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for flag in ("--group-size", "--loss-type", "--quantize / --no-quantize", "--epsilon-high", "--reward-weights"):
        assert flag in result.output


def test_the_cli_and_its_options_load_without_mlx():
    # MLX loads inside the commands, after the options parse (and after the OpenBLAS re-exec).
    code = "import sys, grpo_mlx.cli, grpo_mlx.core.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"



@pytest.mark.parametrize("kind", [TrainConfig, EvalConfig, GenerateConfig])
def test_every_option_has_one_help_section(kind):
    from dataclasses import fields

    from grpo_mlx.cli import OPTION_GROUPS

    sections = [title for f in fields(kind) for title, names in OPTION_GROUPS.items() if f.name in names]
    assert len(sections) == len(fields(kind)), [f.name for f in fields(kind) if sum(f.name in n for n in OPTION_GROUPS.values()) != 1]


def test_train_help_lists_its_options_in_sections_under_their_own_names():
    from click.testing import CliRunner

    from grpo_mlx.cli import OPTION_GROUPS, cli

    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=100).output
    titles = [f"{title} options:" for title in OPTION_GROUPS]
    assert [line for line in text.splitlines() if line in titles] == titles and "Other options:" not in text
    for f in __import__("dataclasses").fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name

def test_user_errors_print_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--group-size", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group_size" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", [TrainConfig, EvalConfig, GenerateConfig])
def test_shared_fields_have_one_help_and_one_rule_set(kind):
    from dataclasses import fields

    for f in fields(kind):
        if f.name in SHARED:
            rules = {k: v for k, v in SHARED[f.name].items() if k not in ("default", "help")}
            assert {k: f.metadata[k] for k in rules} == rules or f.name == "temperature" and kind is TrainConfig, f.name


def test_eval_and_generate_take_the_sampling_flags_with_their_own_defaults():
    runner = CliRunner()
    for command in ("eval", "generate"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0
        for flag in ("--temperature", "--top-p", "--top-k", "--min-p", "--max-tokens", "--system-prompt", "--seed"):
            assert flag in result.output, (command, flag)
    assert (EvalConfig().split, EvalConfig().temperature, GenerateConfig(prompt="hi").temperature) == ("test", 1.0, 0.0)
    assert build_config({}, {"prompt": "hi", "top_k": "4"}, GenerateConfig).top_k == 4


def test_an_option_of_another_command_is_refused_naming_the_command():
    with pytest.raises(UserError, match="unknown config option 'group_size': see `grpo-mlx eval --help`"):
        build_config({"group_size": 4}, {}, EvalConfig)
    with pytest.raises(UserError, match="prompt is not set"):
        build_config({}, {}, GenerateConfig)


def test_a_leading_tilde_in_a_path_is_the_home_folder(monkeypatch, tmp_path):
    from grpo_mlx.core.config import TrainConfig, build_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = build_config({"output": "~/runs/x"}, {"model": "~/models/m"}, TrainConfig)
    assert config.output == str(tmp_path / "runs" / "x") and config.model == str(tmp_path / "models" / "m")
