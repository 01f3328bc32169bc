"""Real model shapes without downloads: published configurations, built with random weights.

Memory and speed at real scale depend on a model's shape (vocabulary, width, heads,
layers), not on its weights. `SHAPES` holds the `config.json` fields of the models our
users train, copied from their published configurations, so `grpo-mlx plan` works
offline and benchmarks and tests can build a model of the same shape:
`make_shape_model` gives it random weights, optionally fewer layers (a step then runs in
minutes on a CPU; memory and time scale with the layer count, which the memory model
treats explicitly) and 4- or 8-bit quantization, and a small byte-level BPE tokenizer.
Token ids past the tokenizer's vocabulary decode to nothing, so sampling from the full
vocabulary is harmless.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..core.errors import UserError

_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=32768)
_LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
              rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=_LLAMA32_ROPE)

SHAPES = {
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "qwen2.5-3b": {**_QWEN2, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    "llama-3.2-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "vocab_size": 128256, "tie_word_embeddings": True},
    "llama-3.2-3b": {**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "vocab_size": 128256, "tie_word_embeddings": True},
}


def shape_config(name: str, num_layers: int | None = None) -> dict:
    """The configuration of a known shape, with `num_layers` blocks when given."""
    if name not in SHAPES:
        raise UserError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    config = dict(SHAPES[name])
    if num_layers is not None:
        if not 1 <= num_layers:
            raise UserError(f"a model needs at least one layer, got {num_layers}")
        config["num_hidden_layers"] = num_layers
    return config


def make_shape_model(path, name: str, num_layers: int | None = None, bits: int | None = None,
                     group_size: int = 64, texts: list[str] | None = None, tokenizer_vocab: int = 2048,
                     seed: int = 0) -> Path:
    """A random-weight float32 model of shape `name` (see `SHAPES`) saved to `path` for `mlx_lm.load`.

    `bits` (4 or 8) quantizes every linear layer and the embedding as mlx-lm's
    `convert -q` does. The tokenizer is trained on `texts` (default: the tiny models' chat corpus).
    """
    from mlx_lm.utils import quantize_model

    from .tiny_model import chat_corpus, train_tokenizer, write_model_dir

    config = {**shape_config(name, num_layers), "torch_dtype": "float32"}
    tokenizer = train_tokenizer(texts if texts is not None else chat_corpus(), tokenizer_vocab)
    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    if bits is not None:
        model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    return write_model_dir(path, dict(tree_flatten(model.parameters())), config, tokenizer)
