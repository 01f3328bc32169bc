"""`grpo-mlx convert` and `--model FILE.gguf` on GGUF files written here from tiny models.

The writer below does what llama.cpp's converter does (its tensor names, its q/k row
permutation for llama, the tokenizer as metadata), so a converted model must give the
original model's logits exactly. The real SmolLM2 file is in test_real_model.py.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from grpo_mlx.cli import cli, main
from grpo_mlx.model.convert import (convert, gguf_model_folder, llama3_rope_factors, llama3_rope_scaling,
                              unpermute_rotary)
from grpo_mlx.core.errors import UserError
from grpo_mlx.model.tiny_model import chat_corpus, train_tokenizer, write_model_dir

HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (written out independently of the code under test)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def tiny_model(model_type: str, tmp_path: Path, tie: bool = True):
    from mlx_lm.models import llama, qwen2

    tokenizer = train_tokenizer(chat_corpus(300), 400)
    args = dict(model_type=model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, rms_norm_eps=1e-5, vocab_size=tokenizer.get_vocab_size(),
                max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=tie)
    module = llama if model_type == "llama" else qwen2
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(args))
    # Non-trivial biases and norms, so a tensor put in the wrong place shows in the logits.
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    config = {**args, "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"]}
    weights = dict(tree_flatten(model.parameters()))
    return write_model_dir(tmp_path / f"hf-{model_type}", weights, config, tokenizer), model, args


def write_gguf(model_dir: Path, args: dict, path: Path, architecture: str | None = None) -> Path:
    """A GGUF file of an mlx-lm model folder, laid out as llama.cpp writes one."""
    weights = mx.load(str(model_dir / "model.safetensors"))
    arch = args["model_type"]
    tensors = {}
    for name, value in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            module, suffix = ".".join(rest[:-1]), rest[-1]
            value = np.array(value)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                value = llama_cpp_permute(value, args["num_attention_heads" if "q_proj" in module else "num_key_value_heads"])
            tensors[f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"] = mx.array(value)
        else:
            tensors[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]] = value
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    im_end = tokens.index("<|im_end|>")
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    arch = architecture or arch
    metadata = {
        "general.architecture": arch,
        f"{arch}.embedding_length": u32(args["hidden_size"]), f"{arch}.block_count": u32(args["num_hidden_layers"]),
        f"{arch}.feed_forward_length": u32(args["intermediate_size"]),
        f"{arch}.attention.head_count": u32(args["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(args["num_key_value_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(args["rms_norm_eps"], dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(args["rope_theta"], dtype=mx.float32),
        f"{arch}.context_length": u32(args["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2" if arch == "qwen2" else "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in specials else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": u32(im_end), "tokenizer.ggml.padding_token_id": u32(im_end),
        "tokenizer.chat_template": template,
    }
    mx.save_gguf(str(path), tensors, metadata)
    return path


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model_dir, model, args = tiny_model("llama", tmp)
    return write_gguf(model_dir, args, tmp / "tiny-llama.gguf"), model_dir, model


def logits_of(model, tokens):
    return np.array(model(mx.array([tokens])).astype(mx.float32))


def test_unpermute_rotary_inverts_llama_cpp_permutation_and_is_not_the_identity():
    rows = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of dimension 8, 3 columns
    permuted = llama_cpp_permute(rows, heads=2)
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(unpermute_rotary(permuted, heads=2), rows)
    # Head 0's rotate-half pairs (0, 4), (1, 5)... are interleaved neighbours in llama.cpp's layout.
    assert list(permuted[:4, 0] // 3) == [0, 4, 1, 5]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_converted_gguf_gives_the_original_models_logits_and_tokens(model_type, tmp_path, llama_gguf):
    from mlx_lm import load

    if model_type == "llama":
        gguf, model_dir, model = llama_gguf
    else:
        model_dir, model, args = tiny_model("qwen2", tmp_path, tie=False)  # qwen2: q/k/v biases, an untied head
        gguf = write_gguf(model_dir, args, tmp_path / "tiny-qwen2.gguf")
    out = convert(gguf, tmp_path / "converted", dtype="float32", log=lambda _: None)
    converted, tokenizer = load(str(out))  # mlx-lm opens it unchanged
    original = load(str(model_dir))[1]
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.decode(original.encode(text)) == text
    np.testing.assert_allclose(logits_of(converted, tokenizer.encode(text)), logits_of(model, tokenizer.encode(text)),
                               rtol=1e-5, atol=1e-5)
    # The chat template's end-of-turn token ends generation.
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_float_gguf_stays_float_and_q_bits_quantizes_it(tmp_path, llama_gguf):
    """(Q4_1/Q8_0 blocks kept quantized, and their rows un-permuted: the real SmolLM2 file, test_real_model.py.)"""
    from mlx_lm import load

    gguf, _, model = llama_gguf
    out = convert(gguf, tmp_path / "converted", dtype="float32", log=lambda _: None)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    requantized = convert(gguf, tmp_path / "q8", dtype="float32", q_bits=8, q_group_size=32, log=lambda _: None)
    quantization = json.loads((requantized / "config.json").read_text())["quantization"]
    assert (quantization["group_size"], quantization["bits"]) == (32, 8)
    quantized, tokenizer = load(str(requantized))
    assert type(quantized.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    tokens = tokenizer.encode("12 + 30 = 42")
    got, want = logits_of(quantized, tokens).ravel(), logits_of(model, tokens).ravel()
    assert not np.array_equal(got, want) and np.corrcoef(got, want)[0, 1] > 0.999  # 8-bit rounding, nothing worse


def test_llama3_rope_scaling_is_recovered_from_rope_freqs():
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors(scaling, 500000.0, 64)
    assert factors.min() == 1.0 and factors.max() == 32.0 and len(set(np.round(factors, 3))) > 2
    assert llama3_rope_scaling(factors, 500000.0, 64) == scaling
    with pytest.raises(UserError, match="not Llama 3's recipe"):
        llama3_rope_scaling(np.linspace(1, 8, 32), 500000.0, 64)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_bad_inputs_are_one_line_each_exit_2_and_nothing_is_overwritten(tmp_path, llama_gguf, capsys):
    gguf, model_dir, _ = llama_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("hello")
    other_arch = write_gguf(model_dir, json.loads((model_dir / "config.json").read_text()), tmp_path / "gemma.gguf",
                            architecture="gemma2")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        ([str(truncated), str(tmp_path / "a")], "cannot read this GGUF file"),
        ([str(not_gguf), str(tmp_path / "b")], "is not a GGUF file"),
        ([str(other_arch), str(tmp_path / "c")], "GGUF architecture 'gemma2' is not supported"),
        ([str(tmp_path / "missing.gguf"), str(tmp_path / "d")], "no such file"),
        ([str(gguf), str(existing)], "already exists"),
    ]
    for args, message in cases:
        code, err = run_cli(["convert", *args], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not Path(args[1]).exists() or Path(args[1]) == existing
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder left


def test_model_flag_takes_a_gguf_converted_once_into_the_cache(tmp_path, llama_gguf, monkeypatch):
    gguf, _, _ = llama_gguf
    monkeypatch.setenv("GRPO_MLX_CACHE", str(tmp_path / "cache"))
    said = []
    folder = gguf_model_folder(gguf, log=said.append)
    assert (folder / "config.json").is_file() and folder.parent == tmp_path / "cache" / "gguf"
    assert said == [f"model {gguf.name}: converting it once to an mlx-lm folder in {folder}"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_model_folder(gguf, log=said.append) == folder
    assert said[-1] == f"model {gguf.name}: using its conversion in {folder}"
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again

    # generate and plan take the file as --model.
    result = CliRunner().invoke(cli, ["generate", "--model", str(gguf), "--prompt", "hi", "--max-tokens", "3"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["plan", "--model", str(gguf)])
    assert result.exit_code == 0 and "2 layers, hidden 64" in result.output, result.output


def test_a_hugging_face_folder_converts_through_mlx_lm_quantized_and_refuses_a_folder_without_config(tmp_path,
                                                                                                     tiny_model_dir):
    from mlx_lm import load

    out = convert(tiny_model_dir, tmp_path / "q4", q_bits=4, q_group_size=32, log=lambda _: None)
    model, tokenizer = load(str(out))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert tokenizer.encode("12 + 30") == load(str(tiny_model_dir))[1].encode("12 + 30")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        convert(empty, tmp_path / "x", log=lambda _: None)
    assert not (tmp_path / "x").exists()


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, llama_gguf):
    gguf, _, _ = llama_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(UserError, match="cannot write .*choose a folder you can write to"):
        convert(gguf, blocker / "model", log=lambda _: None)
    assert blocker.read_text() == "mine"
