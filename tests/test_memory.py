"""The memory model (grpo_mlx/memory.py) against built models and measured training steps."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from grpo_mlx.memory.estimate import ModelShape, StepShape, estimate_step, lora_parameters, weights_bytes
from grpo_mlx.model.policy import attach_adapters
from grpo_mlx.model.shapes import make_shape_model, shape_config

REPO = Path(__file__).resolve().parents[1]


def build(config: dict):
    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("name, untie", [("qwen2.5-0.5b", False), ("qwen2.5-0.5b", True), ("llama-3.2-1b", False)])
def test_float32_weights_are_four_bytes_per_parameter_of_the_built_model(name, untie):
    # Two layers and a small vocabulary: the same terms (embeddings, biases, norms, untied head) at a small size.
    config = {**shape_config(name, 2), "vocab_size": 256, "tie_word_embeddings": not untie and
              shape_config(name)["tie_word_embeddings"]}
    assert weights_bytes(ModelShape.from_config(config)) == 4 * parameter_count(build(config))


def test_quantized_weights_match_the_saved_safetensors(tmp_path):
    path = make_shape_model(tmp_path / "q4", "qwen2.5-0.5b", num_layers=2, bits=4)
    config = json.loads((path / "config.json").read_text())
    model = ModelShape.from_config(config)
    assert model.bits == 4 and model.group_size == 64
    saved = (path / "model.safetensors").stat().st_size  # the arrays plus a small header
    assert abs(weights_bytes(model) - saved) / saved < 0.02, (weights_bytes(model), saved)


@pytest.mark.parametrize("lora_layers", [1, -1])
def test_lora_parameters_are_the_trainable_parameters_of_an_adapted_model(lora_layers):
    config = {**shape_config("llama-3.2-1b", 2), "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    model = build(config)
    attach_adapters(model, rank=8, num_layers=lora_layers, scale=20.0)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    step = StepShape(batch_size=1, group_size=2, prompt_tokens=8, max_tokens=8, micro_batch_size=2,
                     lora_rank=8, lora_layers=lora_layers)
    assert lora_parameters(ModelShape.from_config(config), step) == trainable


def test_layer_count_enters_explicitly():
    """Each added layer adds its weights and its saved activations: a straight line in the layer count."""
    step = StepShape(batch_size=2, group_size=8, prompt_tokens=120, max_tokens=128, micro_batch_size=8, lora_layers=-1)
    peaks = [estimate_step(ModelShape.from_config(shape_config("qwen2.5-0.5b", n)), step)["policy"] for n in (1, 2, 3)]
    assert peaks[2] - peaks[1] == peaks[1] - peaks[0] > 0


# (shape, layers, bits, B, G, completion tokens, micro-batch, grad checkpoint): cheap real steps.
MEASURED = [
    ("qwen2.5-0.5b", 2, None, 2, 4, 32, 8, False),
    ("qwen2.5-0.5b", 2, None, 1, 4, 32, 4, True),
    ("llama-3.2-1b", 1, None, 1, 4, 16, 4, False),
]


@pytest.mark.parametrize("setting", MEASURED, ids=lambda s: f"{s[0]}-l{s[1]}{'-ckpt' if s[7] else ''}")
def test_predicted_peak_is_within_15_percent_of_a_measured_step(setting, tmp_path_factory):
    # A fresh process per step: gradient checkpointing patches the block class process-wide, and the
    # allocator starts empty.
    cache = tmp_path_factory.getbasetemp() / "memory-shapes"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "memory_check.py"), "--cache", str(cache),
                          "--one", json.dumps(setting)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    measured, predicted = result["measured"]["peak"], result["predicted"]["peak"]
    assert min(result["measured"]["completion_lengths"]) == setting[5]  # random weights: no early stop
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured, result)


class _SilentTokenizer:
    eos_token_ids = {0}

    def decode(self, ids):
        return ""


@pytest.mark.parametrize("stop_early", [True, False])
def test_the_rollout_peak_is_the_predicted_one_also_when_rows_stop_early(stop_early):
    # A model whose KV cache outweighs its weights (8 layers, 4 KV heads of 64, a 1,000-token vocabulary): when a
    # row stops, mlx-lm's generator copies the batch cache without it while the old one lives (measured on
    # SmolLM2: 1.76 GB against 1.20 GB when no row stops), which rollout_bytes counts as a second cache.
    from grpo_mlx.memory.estimate import rollout_bytes
    from grpo_mlx.rollout.batch import generate_rollout

    config = {**shape_config("llama-3.2-1b", 8), "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "tie_word_embeddings": True}
    model = build(config)
    B, G, P, T = 4, 8, 120, 8
    prompts = [[1 + (7 * i + j) % 900 for j in range(P)] for i in range(B)]

    calls = []

    def sampler(logprobs):  # the first row stops at the first token (token 0 ends a row), the others never
        tokens = 1 + mx.argmax(logprobs[:, 1:], axis=-1)
        calls.append(1)
        return mx.where(mx.arange(tokens.shape[0]) == 0, 0, tokens) if stop_early and len(calls) == 1 else tokens

    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    rollout = generate_rollout(model, _SilentTokenizer(), prompts, G, T, sampler)
    measured = mx.get_peak_memory() - resident
    assert sorted(rollout.completion_lengths)[:2] == ([1, T] if stop_early else [T, T])
    predicted = rollout_bytes(ModelShape.from_config(config), StepShape(B, G, P, T, B * G))
    if stop_early:
        assert abs(measured / predicted - 1) < 0.10, (measured, predicted)
    else:  # no copy: one cache fewer than the prediction, which plans for rows that stop
        assert measured < predicted


def test_a_micro_batch_within_one_group_is_predicted_from_its_own_prompt():
    """Micro-batches run only as wide as their own longest row (gradients.micro_batch_widths): within one group
    a completion call is T wide whatever the batch's prompt spread; across groups it spans the spread; under
    --compile (trimmed=False) the widths round up to LENGTH_BUCKET."""
    from dataclasses import replace

    from grpo_mlx.memory.estimate import pass_shape

    # SmolLM2's step at T=64: GSM8K prompts of 133-160 tokens with the R1 system prompt.
    step = StepShape(batch_size=4, group_size=8, prompt_tokens=160, shortest_prompt=133, max_tokens=64, micro_batch_size=8)
    assert pass_shape(step)["scored"] == 64
    assert pass_shape(replace(step, micro_batch_size=4))["scored"] == 64  # part of one group
    assert pass_shape(replace(step, micro_batch_size=16))["scored"] == 160 + 64 - 133  # two groups: the spread
    assert pass_shape(replace(step, micro_batch_size=3))["scored"] == 160 + 64 - 133  # parts joining two groups
    assert pass_shape(replace(step, trimmed=False))["scored"] == 224 - 133  # padded to 224, from the shortest prompt
    model = ModelShape.from_config(shape_config("qwen2.5-0.5b"))
    assert estimate_step(model, step)["policy"] < estimate_step(model, replace(step, micro_batch_size=16))["policy"]
