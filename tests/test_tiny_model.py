"""The self-built models: test fixtures from `make_tiny_model` and the shipped demo model."""

import mlx.core as mx
import pytest
from mlx_lm import load

from grpo_mlx.data.examples import arithmetic_examples
from grpo_mlx.core.errors import UserError
from grpo_mlx.model import tiny_model
from grpo_mlx.eval.demo import greedy_accuracy
from grpo_mlx.model.tiny_model import demo_model_path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def test_tiny_model_loads_with_mlx_lm(tiny):
    model, tokenizer = tiny
    assert model.args.model_type == "qwen2"
    assert tokenizer.has_chat_template


def test_chat_template_ends_with_assistant_generation_prompt(tiny):
    _, tokenizer = tiny
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_eos_is_im_end(tiny):
    _, tokenizer = tiny
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_digits_are_single_tokens(tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode("What is 123 plus 45?", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids if tokenizer.decode([i]).isdigit()] == list("12345")


def test_forward_gives_logits_over_vocab(tiny):
    model, tokenizer = tiny
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 plus 2?"}],
                                        add_generation_prompt=True)
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), model.args.vocab_size)
    assert logits.dtype == mx.float32


def test_missing_demo_model_raises_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "DEMO_MODEL_DIR", tmp_path)
    with pytest.raises(UserError, match="build_demo_model.py"):
        tiny_model.demo_model_path()


def test_demo_model_leaves_room_to_learn():
    model, tokenizer = load(str(demo_model_path()))
    accuracy = greedy_accuracy(model, tokenizer, arithmetic_examples(50, seed=1234))
    assert 0.1 <= accuracy <= 0.8
