"""--lora-keys: which modules of each block get adapters, through mlx-lm's own `keys`; mlx-lm loads the result."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from grpo_mlx.cli import cli, main
from grpo_mlx.core.config import build_config
from grpo_mlx.core.errors import UserError
from grpo_mlx.model.policy import adapter_layers, attach_adapters, load_model

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"
ATTENTION = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
MLP = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def adapted_names(model) -> set[str]:
    """Module names, relative to their block, that carry an adapter."""
    return {name.split(".", 3)[3] for name, _ in adapter_layers(model)}  # model.layers.N.<name>


@pytest.mark.parametrize("keys, expected", [
    (None, ATTENTION + MLP),  # mlx-lm's default
    (["all-linear"], ATTENTION + MLP),
    (["attention"], ATTENTION),
    (["self_attn.q_proj", "mlp.down_proj"], ["mlp.down_proj", "self_attn.q_proj"]),
    (["attention", "mlp.up_proj"], ATTENTION + ["mlp.up_proj"]),
])
def test_lora_keys_choose_the_adapted_modules(tiny_model_dir, keys, expected):
    model, _, _ = load_model(str(tiny_model_dir))
    adapter_config = attach_adapters(model, rank=4, num_layers=-1, scale=20.0, keys=keys)
    assert adapted_names(model) == set(expected)
    assert adapter_config["lora_parameters"].get("keys") == (sorted(expected) if keys else None)


def test_a_module_name_no_block_has_is_one_line_listing_the_names(tiny_model_dir):
    model, _, _ = load_model(str(tiny_model_dir))
    with pytest.raises(UserError) as e:
        attach_adapters(model, rank=4, num_layers=-1, scale=20.0, keys=["self_attn.q"])
    message = str(e.value)
    assert "\n" not in message and "no module 'self_attn.q'" in message
    assert "all-linear or attention" in message and ", ".join(sorted(ATTENTION + MLP)) in message


def test_lora_keys_reads_a_comma_list_from_the_command_line_or_a_list_from_yaml():
    assert build_config({}, {"lora_keys": "self_attn.q_proj, mlp.down_proj"}).lora_keys == ["self_attn.q_proj", "mlp.down_proj"]
    assert build_config({"lora_keys": ["attention"]}, {}).lora_keys == ["attention"]
    assert build_config({}, {}).lora_keys is None


def test_a_run_with_lora_keys_loads_unchanged_in_mlx_lm(tiny_model_dir, tmp_path):
    from mlx_lm import load

    from grpo_mlx.model.fuse import load_with_adapters

    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "1", "--batch-size", "1",
            "--group-size", "2", "--max-tokens", "4", "--learning-rate", "0.05", "--reward", TEXT_REWARD,
            "--lora-keys", "self_attn.v_proj,mlp.down_proj"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.v_proj"]
    weights = mx.load(str(run_dir / "adapters.safetensors"))
    assert {k.split(".", 3)[3].rsplit(".", 1)[0] for k in weights} == {"mlp.down_proj", "self_attn.v_proj"}
    ours, _, _ = load_with_adapters(str(tiny_model_dir), str(run_dir))
    theirs, _ = load(str(tiny_model_dir), adapter_path=str(run_dir))
    assert adapted_names(theirs) == {"mlp.down_proj", "self_attn.v_proj"}
    x = mx.array([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(np.array(theirs(x)), np.array(ours(x)), atol=1e-5)


def test_an_unknown_lora_key_on_the_command_line_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "1", "--group-size", "2", "--max-tokens", "4", "--reward", TEXT_REWARD, "--lora-keys", "q_proj"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lora-keys: no module 'q_proj'") and "self_attn.q_proj" in err[0]
