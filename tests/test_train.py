"""`grpo-mlx train` end to end, and guards against the failure classes of other MLX GRPO trainers."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from grpo_mlx.cli import cli
from grpo_mlx.core.config import build_config
from grpo_mlx.train.trainer import setup, train

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


def test_the_logprob_path_is_logged_at_start_up_and_recorded_in_config_yaml(trained_run_dir, tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    from mlx_lm.models import qwen2

    from grpo_mlx.core.config import load_config_file

    messages = []
    run = setup(small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD]), log=messages.append)
    assert run.logprob_path == "shared-prompt"
    assert "log-probs: each group's prompt runs once, logits on completion positions only" in messages
    # config.yaml names it in a comment, and still loads as a --config file.
    config_yaml = trained_run_dir / "config.yaml"
    assert "\n# logprob_path: shared-prompt\n" in config_yaml.read_text()
    assert build_config(load_config_file(config_yaml)).steps == 2
    # --grad-checkpoint keeps the shared prompt (its keys and values cross the checkpoint as arrays).
    monkeypatch.setattr(qwen2.TransformerBlock, "__call__", qwen2.TransformerBlock.__call__)  # the patch is process-wide
    monkeypatch.setattr(qwen2.TransformerBlock, "_grpo_mlx_checkpointed", False, raising=False)
    messages.clear()
    run = setup(small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD], grad_checkpoint=True), log=messages.append)
    assert run.logprob_path == "shared-prompt"
    assert "log-probs: each group's prompt runs once, logits on completion positions only" in messages


def test_later_iterations_use_the_sampling_policys_logprobs_as_old(tiny_model_dir, tmp_path, monkeypatch):
    """mu = 3: update 1's old log-probs are its own forward (ratio exactly 1); updates 2 and 3 both take
    exp(log pi_theta_k - log pi_theta0) with theta0 the sampling policy, computed here independently.
    mu = 3 because old log-probs refreshed every update agree with these for updates 1 and 2."""
    import grpo_mlx.train.trainer as trainer
    from grpo_mlx.model.logprobs import token_logprobs
    from grpo_mlx.model.policy import reference_mode
    from grpo_mlx.rollout.batch import generate_rollout, pad_batch

    config = small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD], num_iterations=3, learning_rate=0.2, max_grad_norm=0)
    run = setup(config)
    # Adapters that matter before the step, so that the sampling policy differs from the reference.
    run.model.load_weights([(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(run.model.trainable_parameters())
                            if k.endswith("lora_b")], strict=False)
    theta0 = dict(tree_flatten(run.model.trainable_parameters()))
    rollouts, updates = [], []
    run.rollout_fn = lambda *args, **kwargs: rollouts.append(generate_rollout(*args, **kwargs)) or rollouts[-1]
    real_apply_update = trainer.apply_update

    def recording_apply_update(run, *args):
        metrics = real_apply_update(run, *args)
        updates.append((metrics, dict(tree_flatten(run.model.trainable_parameters()))))
        return metrics

    monkeypatch.setattr(trainer, "apply_update", recording_apply_update)
    (metrics, _), = list(train(run))
    assert len(rollouts) == 1 and len(updates) == 3

    rollout = rollouts[0]
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens)
    mask = np.array(mask)

    def logprobs_with(weights):
        run.model.load_weights(list(weights.items()), strict=False)
        return np.array(token_logprobs(run.model, tokens, config.temperature), dtype=np.float64)

    sampling, after_first, after_second = (logprobs_with(w) for w in (theta0, updates[0][1], updates[1][1]))
    with reference_mode(run.model):
        reference = np.array(token_logprobs(run.model, tokens, config.temperature), dtype=np.float64)

    def ratio_mean(new, old):
        return float((np.exp(new - old) * mask).sum() / mask.sum())

    assert updates[0][0]["ratio/mean"] == 1.0  # the first update's policy is the sampling one
    expected = ratio_mean(after_first, sampling)
    assert abs(expected - 1.0) > 1e-3  # the first update moved the policy
    assert abs(ratio_mean(after_first, reference) - expected) > 1e-3  # old = reference would be seen
    assert updates[1][0]["ratio/mean"] == pytest.approx(expected, rel=1e-4)
    # Update 3: still against theta0; old log-probs refreshed to theta1's would be seen.
    expected = ratio_mean(after_second, sampling)
    assert abs(ratio_mean(after_second, after_first) - expected) > 1e-3
    assert updates[2][0]["ratio/mean"] == pytest.approx(expected, rel=1e-4)
    assert metrics["ratio/mean"] == updates[2][0]["ratio/mean"]  # the step reports the last update's ratios


def test_the_kl_term_is_measured_against_the_base_model_not_the_adapted_policy(tiny_model_dir, tmp_path):
    """With adapters that matter, the step's `kl` is the k3 estimate of KL(pi_theta || base) on the sampled
    tokens, recomputed here in float64 from the sampling policy's log-probs and those of the base model
    loaded on its own: a reference pass run with the adapters still on would give exactly 0."""
    from mlx_lm.utils import load

    from grpo_mlx.model.logprobs import token_logprobs
    from grpo_mlx.rollout.batch import generate_rollout, pad_batch

    config = small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD], beta=0.04, kl_estimator="k3")
    run = setup(config)
    run.model.load_weights([(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(run.model.trainable_parameters())
                            if k.endswith("lora_b")], strict=False)
    theta0 = dict(tree_flatten(run.model.trainable_parameters()))
    rollouts = []
    run.rollout_fn = lambda *args, **kwargs: rollouts.append(generate_rollout(*args, **kwargs)) or rollouts[-1]
    (metrics, _), = list(train(run))  # mu = 1: the step's metrics are those of the sampling policy, theta0

    tokens, mask = pad_batch(rollouts[0].prompt_tokens, rollouts[0].completion_tokens)
    run.model.load_weights(list(theta0.items()), strict=False)
    policy = np.array(token_logprobs(run.model, tokens, config.temperature), dtype=np.float64)
    base, _ = load(str(tiny_model_dir))
    reference = np.array(token_logprobs(base, tokens, config.temperature), dtype=np.float64)
    m = np.array(mask, dtype=np.float64)
    log_ratio = reference - policy
    expected = float(((np.exp(log_ratio) - log_ratio - 1.0) * m).sum() / m.sum())
    assert expected > 1e-4  # the adapters move the policy off the base: the check has teeth
    assert metrics["kl"] == pytest.approx(expected, rel=1e-3)


def test_each_step_draws_its_own_sampling_noise(tiny_model_dir, tmp_path):
    """The sampling noise is seeded by (seed, step, rank), so --resume redraws a step's noise exactly
    (tests/test_reliability.py); the step must be in it, or every step would sample with the same noise."""
    run = setup(small_config(tiny_model_dir, tmp_path, reward=[TEXT_REWARD], steps=3))
    real_rollout, draws = run.rollout_fn, []

    def recording_rollout(*args, **kwargs):
        draws.append(np.array(mx.random.uniform(shape=(8,))))  # the generator's state as sampling begins
        return real_rollout(*args, **kwargs)

    run.rollout_fn = recording_rollout
    list(train(run))
    assert len(draws) == 3
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


def test_group_of_two_trains_with_finite_metrics(tiny_model_dir, tmp_path):
    run = setup(small_config(tiny_model_dir, tmp_path, group_size=2, batch_size=3, reward=[TEXT_REWARD]))
    (metrics, _), = list(train(run))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics


def test_beta_zero_runs_no_reference_pass(tiny_model_dir, tmp_path, monkeypatch):
    import grpo_mlx.train.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "reference_mode", lambda model: calls.append(1) or pytest.fail("reference pass"))
    run = setup(small_config(tiny_model_dir, tmp_path, beta=0.0, reward=[TEXT_REWARD]))
    list(train(run))
    assert calls == []


def test_train_fuse_and_load_give_the_same_greedy_output(trained_run_dir, tiny_model_dir, tmp_path):
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    from grpo_mlx.data.examples import Example
    from grpo_mlx.data.prompts import render_prompt
    from grpo_mlx.model.fuse import load_with_adapters

    run_dir, fused_dir = trained_run_dir, tmp_path / "fused"  # trained by `grpo-mlx train` (conftest.py)
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


def test_existing_run_directory_is_not_overwritten_silently(trained_run_dir, tiny_model_dir, tmp_path):
    from grpo_mlx.cli import main

    run_dir = tmp_path / "r"
    shutil.copytree(trained_run_dir, run_dir)
    (run_dir / "notes.txt").write_text("the user's own notes\n")
    before = files_with_contents(run_dir)
    args = ["train", "--model", str(tiny_model_dir), "--output", str(run_dir), "--steps", "1", "--batch-size", "1",
            "--group-size", "2", "--max-tokens", "4", "--reward", TEXT_REWARD]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    after = files_with_contents(run_dir)
    # Every file still there, same bytes, same mtime; the lock file is grpo-mlx's own
    # bookkeeping, rewritten with the pid of whoever last took the lock.
    before.pop(".grpo-mlx-lock", None)
    assert {k: after.get(k) for k in before} == before


def files_with_contents(directory):
    """{relative path: (bytes, mtime_ns)} of every file under `directory`."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(directory).rglob("*") if p.is_file()}
