"""`grpo-mlx train` options beyond the defaults: QLoRA, DoRA, the reference policy, DAPO's pieces, generate."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from grpo_mlx.cli import cli, main
import grpo_mlx.train.trainer as trainer
from grpo_mlx.core.config import build_config
from grpo_mlx.data.examples import Example, epoch_order
from grpo_mlx.data.prompts import render_prompt
from grpo_mlx.model.fuse import load_with_adapters
from grpo_mlx.model.policy import reference_mode
from grpo_mlx.train.trainer import setup, train

PLUGINS = Path(__file__).parent / "plugin_rewards.py"
TEXT_REWARD = f"{PLUGINS}:text_length"


def train_cli(model_dir, run_dir, *extra):
    args = ["train", "--model", str(model_dir), "--output", str(run_dir), "--steps", "2", "--batch-size", "2",
            "--group-size", "4", "--max-tokens", "6", "--learning-rate", "0.05", "--reward", TEXT_REWARD,
            "--seed", "1", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return run_dir


def prompt_tokens(tokenizer):
    return mx.array(render_prompt(tokenizer, Example("What is 21 plus 21?", "42")))[None]


def lora_b(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")}


def test_qlora_trains_on_a_4bit_base_and_fuses_with_and_without_dequantize(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load

    run_dir = train_cli(tiny_model_dir, tmp_path / "run", "--quantize")
    adapted, tokenizer, _ = load_with_adapters(str(tiny_model_dir), run_dir)
    # The base under the adapters is quantized: that is what QLoRA trains against.
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in adapted.named_modules())
    x = prompt_tokens(tokenizer)
    adapted_logits = np.array(adapted(x))
    base, _ = load(str(tiny_model_dir))
    assert np.abs(adapted_logits - np.array(base(x))).max() > 1e-2  # quantization + adapters changed it

    fused = {}
    for name, flag in (("float", "--dequantize"), ("4bit", None)):
        out = tmp_path / f"fused-{name}"
        args = ["fuse", "--model", str(tiny_model_dir), "--adapter-path", str(run_dir), "--output", str(out)]
        result = CliRunner().invoke(cli, args + ([flag] if flag else []))
        assert result.exit_code == 0, result.output
        fused[name], _ = load(str(out))

    # De-quantized weights plus the merged low-rank update are exactly base+adapters.
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused["float"].named_modules())
    np.testing.assert_allclose(np.array(fused["float"](x)), adapted_logits, atol=1e-4, rtol=1e-4)

    # Without --dequantize the merged weights are quantized again, at the base's bits and group
    # size: each weight within one quantization step of the exact merged weight (MLX's affine
    # quantization shifts its grid so that zero is exact, so half a step is not guaranteed).
    float_layers = dict(fused["float"].named_modules())
    checked = 0
    for name, layer in fused["4bit"].named_modules():
        if isinstance(layer, nn.QuantizedLinear):
            assert (layer.bits, layer.group_size) == (4, 64)
            exact = np.array(float_layers[name].weight)
            rounded = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))
            step = np.repeat(np.abs(np.array(layer.scales)), layer.group_size, axis=-1)
            assert np.all(np.abs(rounded - exact) <= step + 1e-5), name
            checked += 1
    assert checked > 0


def test_dora_adapters_train_and_load_unchanged_in_mlx_lm(tiny_model_dir, tmp_path):
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.utils import load

    run_dir = train_cli(tiny_model_dir, tmp_path / "run", "--dora")
    adapted, tokenizer, _ = load_with_adapters(str(tiny_model_dir), run_dir)
    assert any(isinstance(m, DoRALinear) for _, m in adapted.named_modules())
    x = prompt_tokens(tokenizer)
    reloaded, _ = load(str(tiny_model_dir), adapter_path=str(run_dir))
    np.testing.assert_allclose(np.array(reloaded(x)), np.array(adapted(x)), atol=1e-5)
    base, _ = load(str(tiny_model_dir))
    assert np.abs(np.array(adapted(x)) - np.array(base(x))).max() > 1e-3


@pytest.mark.parametrize("dora", [False, True])
def test_reference_mode_is_the_base_model_and_restores_the_adapters(tiny_model_dir, tmp_path, dora):
    from mlx_lm.utils import load

    run = setup(build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "r"), dora=dora, steps=1,
                                      batch_size=2, group_size=4, max_tokens=6, reward=[TEXT_REWARD])))
    # Adapters that matter: random B matrices (they start at zero).
    run.model.load_weights([(k, mx.random.normal(v.shape) * 0.1) for k, v in tree_flatten(run.model.trainable_parameters())
                            if k.endswith("lora_b")], strict=False)
    x = prompt_tokens(run.tokenizer)
    adapted = np.array(run.model(x))
    base, _ = load(str(tiny_model_dir))
    with reference_mode(run.model):
        reference = np.array(run.model(x))
        assert not tree_flatten(run.model.trainable_parameters())  # no adapter is in the graph
    np.testing.assert_allclose(reference, np.array(base(x)), atol=1e-5)
    np.testing.assert_allclose(np.array(run.model(x)), adapted, atol=1e-6)  # adapters back in place
    assert np.abs(adapted - reference).max() > 1e-3


def test_dynamic_sampling_drops_constant_groups_and_draws_more_prompts(tiny_model_dir, tmp_path, monkeypatch):
    constant = f"{PLUGINS}:constant_one"
    config = build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "r"), steps=1, batch_size=2,
                                   group_size=4, max_tokens=4, reward=[constant], dynamic_sampling=True,
                                   max_sampling_rounds=2))
    run = setup(config)
    (metrics, _), = list(train(run))
    # Every group is constant: all three rounds (1 + 2 extra) ran, nothing was kept, no update.
    assert metrics["sampling_rounds"] == 3
    assert metrics["skipped_update"] == 1.0
    assert run.data_position == 2 * 3
    assert all(np.all(b == 0) for b in lora_b(run.model).values())

    # Four examples; the reward is constant on the one answered "2" and varies in every other group.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    seed = next(s for s in range(100) if epoch_order(4, s, 0)[0] == 1)  # "2" is drawn first
    order = epoch_order(4, seed, 0)
    config = build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "v"), steps=1, batch_size=2,
                                   group_size=4, max_tokens=4, dataset=str(data), reward=[f"{PLUGINS}:constant_on_two"],
                                   dynamic_sampling=True, max_sampling_rounds=2, seed=seed))
    run = setup(config)
    kept = []
    real_sample_groups = trainer.sample_groups
    monkeypatch.setattr(trainer, "sample_groups", lambda *a: kept.append(real_sample_groups(*a)) or kept[-1])
    (metrics, _), = list(train(run))
    rollout, examples, rewards = kept[0][:3]
    # Round 1 drew "2" and order[1], and dropped "2"; round 2 drew order[2] in its place.
    assert [ex.answer for ex in examples] == [str(i + 1) for i in order[:3] if i != 1]
    assert rewards == [0.0, 1.0, 2.0, 3.0] * 2 and rollout.num_rows == 8
    assert rollout.prompt_tokens[::4] == [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]
    assert (metrics["sampling_rounds"], metrics["num_groups"], run.data_position) == (2, 2, 3)
    assert metrics["frac_reward_zero_std"] == 0.0 and metrics["skipped_update"] == 0.0
    assert any(np.abs(b).max() > 0 for b in lora_b(run.model).values())


def test_masked_truncated_completions_leave_the_loss(tiny_model_dir, tmp_path):
    # One token per completion on a random model: every completion is cut at max tokens.
    def one_step(mask):
        config = build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / str(mask)), steps=1,
                                       batch_size=2, group_size=4, max_tokens=1, reward=[f"{PLUGINS}:char_codes"],
                                       mask_truncated_completions=mask, learning_rate=1e-2, seed=4))
        run = setup(config)
        (metrics, _), = list(train(run))
        return run, metrics

    run, metrics = one_step(False)
    assert metrics["completions/clipped_ratio"] == 1.0
    assert any(np.abs(b).max() > 0 for b in lora_b(run.model).values())
    run, metrics = one_step(True)
    assert metrics["completions/clipped_ratio"] == 1.0
    assert all(np.all(b == 0) for b in lora_b(run.model).values())  # nothing left in the loss


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_reaches_the_advantages_the_loss_gets(scale, tiny_model_dir, tmp_path, monkeypatch):
    """The advantages handed to the gradient pass are the step's rewards turned into (r - mean) / std by
    `--scale-rewards`, as the float64 reference in test_grpo.py computes them."""
    from test_grpo import ref_advantages

    seen = {}
    real_update_policy, real_accumulate = trainer.update_policy, trainer.accumulate_gradients

    def recording_update_policy(run, rollout, rewards, applicable, *args):
        seen["rewards"], seen["applicable"] = list(rewards), list(applicable)
        return real_update_policy(run, rollout, rewards, applicable, *args)

    def recording_accumulate(grad_step, tokens, mask, advantages, *args, **kwargs):
        seen["advantages"] = np.array(advantages, dtype=np.float64)
        return real_accumulate(grad_step, tokens, mask, advantages, *args, **kwargs)

    monkeypatch.setattr(trainer, "update_policy", recording_update_policy)
    monkeypatch.setattr(trainer, "accumulate_gradients", recording_accumulate)
    config = build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "r"), steps=1, batch_size=2,
                                   group_size=4, max_tokens=6, reward=[TEXT_REWARD], scale_rewards=scale, seed=5))
    list(train(setup(config)))
    rewards = np.array(seen["rewards"], dtype=np.float64)
    assert all(seen["applicable"]) and np.ptp(rewards.reshape(2, 4), axis=1).min() > 0  # every group informative
    np.testing.assert_allclose(seen["advantages"], ref_advantages(rewards, 4, scale), rtol=1e-4, atol=1e-5)


def test_entropy_metric_is_the_policy_entropy_on_the_completions(tiny_model_dir, tmp_path):
    run = setup(build_config({}, dict(model=str(tiny_model_dir), output=str(tmp_path / "r"), steps=1, batch_size=1,
                                      group_size=2, max_tokens=4, reward=[TEXT_REWARD], learning_rate=1e-9)))
    (metrics, _), = list(train(run))
    vocab = run.model.args.vocab_size
    # A random model is near uniform: its entropy is a large fraction of log(V), never above it.
    assert 0.5 * np.log(vocab) < metrics["entropy"] <= np.log(vocab) + 1e-4


def test_generate_with_adapters_matches_mlx_lm_on_base_plus_adapters(trained_run_dir, tiny_model_dir, tmp_path):
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    run_dir = trained_run_dir
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir), "--adapter-path", str(run_dir),
                                      "--prompt", "What is 21 plus 21?", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    model, tokenizer = load(str(tiny_model_dir), adapter_path=str(run_dir))
    expected = generate(model, tokenizer, render_prompt(tokenizer, Example("What is 21 plus 21?", None)), max_tokens=8)
    assert result.output.rstrip("\n") == expected


def test_gguf_export_of_an_unsupported_architecture_is_a_one_line_error(trained_run_dir, tiny_model_dir, tmp_path, capsys):
    run_dir = trained_run_dir
    with pytest.raises(SystemExit) as e:
        main(["fuse", "--model", str(tiny_model_dir), "--adapter-path", str(run_dir), "--output",
              str(tmp_path / "fused"), "--export-gguf"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GGUF" in err[0] and "qwen2" in err[0]


# ---------------------------------------------------------------- --compile, --grad-checkpoint, --lora-dropout, top_k, min_p


def fixed_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
    """The same completions whatever the policy, of lengths 1..max_tokens: runs with different
    options train on the same batches, and text_length's rewards vary within each group."""
    from grpo_mlx.rollout.batch import Rollout

    rows = [list(p) for p in prompts for _ in range(group_size)]
    completions = [[40 + (7 * i + 3 * j) % 200 for j in range(1 + i % max_tokens)] for i in range(len(rows))]
    finish = ["length" if len(c) == max_tokens else "stop" for c in completions]
    return Rollout(rows, completions, [tokenizer.decode(c) for c in completions], finish, group_size)


def train_fixed(model_dir, tmp_path, name, steps=3, **options):
    """Train on fixed completions with plain SGD; returns (run, every adapter array, metrics).

    SGD, not AdamW: Adam's first updates are lr * g / |g|, so rounding noise in a tiny gradient
    element moves it a full lr either way; SGD keeps float32 differences at float32 size.
    """
    import mlx.optimizers as optim

    # One prompt in every row: every step has the same shapes, so a compiled step is traced once.
    data = tmp_path / "one_prompt.jsonl"
    data.write_text(json.dumps({"question": "What is 2 plus 3?", "answer": "5"}) + "\n")
    config = build_config({}, dict(model=str(model_dir), output=str(tmp_path / name), steps=steps, batch_size=2,
                                   group_size=4, max_tokens=6, reward=[TEXT_REWARD], seed=1, learning_rate=0.5,
                                   dataset=str(data), **options))
    run = setup(config)
    run.rollout_fn = fixed_rollout
    run.optimizer = optim.SGD(learning_rate=config.learning_rate)
    metrics = [m for m, _ in train(run)]
    assert all(m["skipped_update"] == 0.0 and np.isfinite(m["loss"]) for m in metrics)
    return run, {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}, metrics


def assert_same_adapters(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=1e-4, err_msg=k)


def assert_trained(run):
    assert all(np.abs(b).max() > 1e-3 for b in lora_b(run.model).values())  # every adapter moved off zero


def counting(monkeypatch, module, name) -> list:
    """Count the calls of module.name (still calling it)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_compile_trains_the_same_adapters_as_eager(tiny_model_dir, tmp_path, monkeypatch):
    compiles = counting(monkeypatch, mx, "compile")
    run, eager, _ = train_fixed(tiny_model_dir, tmp_path, "eager", compile=False)
    assert compiles == []
    assert_trained(run)
    _, compiled, _ = train_fixed(tiny_model_dir, tmp_path, "compiled", compile=True)
    assert compiles == [1]  # the step was compiled once, and reused across steps
    # Three steps: a compiled step that saw stale (captured) weights would drift after the first.
    assert_same_adapters(compiled, eager, atol=1e-5)


def test_grad_checkpoint_trains_the_same_adapters_as_plain(tiny_model_dir, tmp_path, monkeypatch):
    from mlx_lm.models import qwen2

    # mlx-lm's grad_checkpoint patches the block class for the whole process: undo it after this test.
    monkeypatch.setattr(qwen2.TransformerBlock, "__call__", qwen2.TransformerBlock.__call__)
    monkeypatch.setattr(qwen2.TransformerBlock, "_grpo_mlx_checkpointed", False, raising=False)
    checkpoints = counting(monkeypatch, mx, "checkpoint")
    run, plain, _ = train_fixed(tiny_model_dir, tmp_path, "plain", steps=2)
    assert checkpoints == []
    assert_trained(run)
    run, checkpointed, _ = train_fixed(tiny_model_dir, tmp_path, "checkpointed", steps=2, grad_checkpoint=True)
    assert len(checkpoints) >= 2 * len(run.model.layers)  # every block recomputed in each step's backward
    assert_same_adapters(checkpointed, plain, atol=1e-5)


def test_lora_dropout_changes_the_training_forward(tiny_model_dir, tmp_path):
    _, plain, _ = train_fixed(tiny_model_dir, tmp_path, "plain", steps=2)
    run, dropped, metrics = train_fixed(tiny_model_dir, tmp_path, "dropout", steps=2, lora_dropout=0.5)
    assert_trained(run)
    assert all(np.isfinite(v).all() for v in dropped.values())
    assert max(np.abs(dropped[k] - plain[k]).max() for k in plain) > 1e-3  # the dropout masks changed the gradients


def record_rollouts(run, check):
    """Roll out as the trainer asks, then call check(model, sampler, rollout) on each rollout."""
    from grpo_mlx.rollout.batch import generate_rollout

    def rollout_fn(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
        rollout = generate_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs)
        check(model, tokenizer, prompts, rollout)
        return rollout

    run.rollout_fn = rollout_fn


def sampling_run(model_dir, tmp_path, name, **options):
    config = build_config({}, dict(model=str(model_dir), output=str(tmp_path / name), steps=2, batch_size=2,
                                   group_size=4, max_tokens=6, reward=[TEXT_REWARD], seed=2, learning_rate=0.05,
                                   temperature=1.0, **options))
    return setup(config)


@pytest.mark.parametrize("top_k, equal", [(1, True), (0, False)])
def test_top_k_1_samples_the_greedy_completions(top_k, equal, tiny_model_dir, tmp_path):
    from grpo_mlx.rollout.batch import generate_rollout, make_sampler

    same = []

    def check(model, tokenizer, prompts, rollout):
        greedy = generate_rollout(model, tokenizer, prompts, rollout.group_size, 6, make_sampler(0.0))
        same.append(rollout.completion_tokens == greedy.completion_tokens)

    run = sampling_run(tiny_model_dir, tmp_path, f"top_k_{top_k}", top_k=top_k)
    record_rollouts(run, check)
    list(train(run))
    assert len(same) == 2
    assert all(same) if equal else not any(same)  # at temperature 1 without top_k, sampling is not greedy


@pytest.mark.parametrize("min_p", [0.5, 0.0])
def test_min_p_keeps_only_tokens_within_min_p_of_the_most_likely(min_p, tiny_model_dir, tmp_path):
    below = []  # per sampled token: its probability is under 0.5 x the most likely token's

    def check(model, tokenizer, prompts, rollout):
        for prompt, completion in zip(rollout.prompt_tokens, rollout.completion_tokens):
            logits = model(mx.array(prompt + completion)[None])[0, len(prompt) - 1 : -1]
            logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            chosen = logprobs[np.arange(len(completion)), completion]
            below.extend(chosen < np.log(0.5) + logprobs.max(axis=-1) - 1e-5)

    run = sampling_run(tiny_model_dir, tmp_path, f"min_p_{min_p}", min_p=min_p)
    record_rollouts(run, check)
    list(train(run))
    assert len(below) >= 2 * 8
    if min_p:
        assert not any(below)
    else:
        assert sum(below) > len(below) / 4  # without min_p, most draws at temperature 1 fall under it
