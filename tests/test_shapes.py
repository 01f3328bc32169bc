"""Real-shape models (shapes.py): published configurations built with random weights, offline."""

import json

import mlx.core as mx
import pytest
from mlx_lm import load

from grpo_mlx.core.errors import UserError
from grpo_mlx.model.shapes import SHAPES, make_shape_model, shape_config


@pytest.mark.parametrize("name,bits", [("qwen2.5-0.5b", None), ("llama-3.2-1b", 4)])
def test_a_shape_model_loads_with_the_real_vocabulary_and_width(tmp_path, name, bits):
    path = make_shape_model(tmp_path / "model", name, num_layers=1, bits=bits)
    model, tokenizer = load(str(path))
    expected = SHAPES[name]
    logits = model(mx.array([tokenizer.encode("12 + 7 =")]))
    assert logits.shape[-1] == expected["vocab_size"]
    assert len(model.layers) == 1
    assert model.layers[0].self_attn.k_proj.weight.shape[0] == expected["num_key_value_heads"] * (
        expected.get("head_dim") or expected["hidden_size"] // expected["num_attention_heads"])
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == expected["hidden_size"] and config["num_hidden_layers"] == 1
    assert ("quantization" in config) == (bits is not None)
    # ids past the small tokenizer's vocabulary (a random model samples them) decode to nothing
    assert tokenizer.decode([expected["vocab_size"] - 1]) == ""


def test_an_unknown_shape_names_the_known_ones():
    with pytest.raises(UserError, match="qwen2.5-0.5b"):
        shape_config("qwen-0.5b")
    assert shape_config("qwen2.5-7b", num_layers=2)["num_hidden_layers"] == 2
    assert SHAPES["qwen2.5-7b"]["num_hidden_layers"] == 28  # the table itself is not changed
