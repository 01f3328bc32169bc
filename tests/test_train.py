"""`grpo-mlx train` end to end, and guards against the failure classes of other MLX GRPO trainers."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from grpo_mlx.cli import cli
from grpo_mlx.config import build_config
from grpo_mlx.trainer import setup, train

from pathlib import Path

TEXT_REWARD = f"{Path(__file__).parent / 'plugin_rewards.py'}:text_length"


def small_config(model_dir, tmp_path, **overrides):
    values = dict(
        model=str(model_dir), dataset="arithmetic", steps=1, batch_size=2, group_size=4, max_tokens=6,
        learning_rate=1e-2, lora_rank=4, lora_layers=-1, output=str(tmp_path / "run"), seed=3, beta=0.04,
    )
    values.update(overrides)
    return build_config({}, values)


def lora_b_matrices(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")}


def test_one_step_moves_every_lora_b_off_zero(tiny_model_dir, tmp_path):
    run = setup(small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD]))
    assert run.split_head and run.shared_prompt  # Qwen2: prompts once per group, logits for completions only
    assert all(np.all(b == 0) for b in lora_b_matrices(run.model).values())
    (metrics, _), = list(train(run))
    moved = {k: float(np.abs(b).max()) for k, b in lora_b_matrices(run.model).items()}
    assert moved and all(v > 0 for v in moved.values()), moved
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])


def test_second_iteration_sees_stored_old_logprobs(tiny_model_dir, tmp_path):
    config = small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD], num_iterations=2, learning_rate=0.2, max_grad_norm=0)
    run = setup(config)
    (metrics, _), = list(train(run))
    # The last of the two updates reports its ratios: the policy moved away from the stored one.
    assert abs(metrics["ratio/mean"] - 1.0) > 1e-3
    assert metrics["clip_ratio/region_mean"] > 0


def test_group_of_two_trains_with_finite_metrics(tiny_model_dir, tmp_path):
    run = setup(small_config(tiny_model_dir, tmp_path, group_size=2, batch_size=3, reward=[TEXT_REWARD]))
    (metrics, _), = list(train(run))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics


def test_beta_zero_runs_no_reference_pass(tiny_model_dir, tmp_path, monkeypatch):
    import grpo_mlx.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "reference_mode", lambda model: calls.append(1) or pytest.fail("reference pass"))
    run = setup(small_config(tiny_model_dir, tmp_path, beta=0.0, reward=[TEXT_REWARD]))
    list(train(run))
    assert calls == []


def test_train_fuse_and_load_give_the_same_greedy_output(tiny_model_dir, tmp_path):
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    from grpo_mlx.data import Example, render_prompt
    from grpo_mlx.fuse import load_with_adapters

    run_dir, fused_dir = tmp_path / "run", tmp_path / "fused"
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "2", "--batch-size", "2",
            "--group-size", "4", "--max-tokens", "6", "--learning-rate", "0.05", "--reward", TEXT_REWARD, "--seed", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (run_dir / "adapters.safetensors").is_file() and (run_dir / "adapter_config.json").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    result = CliRunner().invoke(cli, ["fuse", "--model", str(tiny_model_dir), "--adapter-path", str(run_dir), "--output", str(fused_dir)])
    assert result.exit_code == 0, result.output

    adapted, tokenizer, _ = load_with_adapters(str(tiny_model_dir), run_dir)
    fused, fused_tokenizer = load(str(fused_dir))
    base, _ = load(str(tiny_model_dir))
    prompt = render_prompt(tokenizer, Example("What is 21 plus 21?", "42"))
    x = mx.array(prompt)[None]
    adapted_logits, fused_logits, base_logits = (np.array(m(x)) for m in (adapted, fused, base))
    np.testing.assert_allclose(fused_logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert np.abs(adapted_logits - base_logits).max() > 1e-2  # the adapters matter, so the check has teeth
    assert generate(fused, fused_tokenizer, prompt, max_tokens=8) == generate(adapted, tokenizer, prompt, max_tokens=8)
    # mlx-lm's own loader accepts the run directory unchanged.
    reloaded, _ = load(str(tiny_model_dir), adapter_path=str(run_dir))
    np.testing.assert_allclose(np.array(reloaded(x)), adapted_logits, atol=1e-5)


def test_resume_reaches_the_same_adapters_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    def run_cli(out, steps, *extra):
        args = ["train", "--model", str(tiny_model_dir), "--output", str(out), "--steps", str(steps),
                "--batch-size", "2", "--group-size", "4", "--max-tokens", "6", "--learning-rate", "0.02",
                "--reward", TEXT_REWARD, "--save-every", "2", "--seed", "5", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output

    run_cli(tmp_path / "full", 4)
    run_cli(tmp_path / "split", 2)
    run_cli(tmp_path / "split", 4, "--resume")
    full = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    split = mx.load(str(tmp_path / "split" / "adapters.safetensors"))
    assert full.keys() == split.keys()
    for k in full:
        np.testing.assert_allclose(np.array(split[k]), np.array(full[k]), atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_existing_run_directory_is_not_overwritten_silently(tiny_model_dir, tmp_path):
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "r"), "--steps", "1", "--batch-size", "1",
            "--group-size", "2", "--max-tokens", "4", "--reward", TEXT_REWARD]
    assert CliRunner().invoke(cli, args).exit_code == 0
    from grpo_mlx.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
