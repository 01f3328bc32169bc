"""Small Qwen2-shaped models the project builds itself, loadable offline by `mlx_lm.load`.

Two uses: random-weight fixtures for tests (`make_tiny_model`, well under a second) and the
embedded demo models (built by `scripts/build_demo_model.py`), which let `grpo-mlx train` show
GRPO learning without downloading anything: `grpo_mlx/demo_model/` (2-digit addition, no
options) and `grpo_mlx/demo_tools_model/` (`--dataset multiplication --tools calculator`).
How the demo task is measured (greedy accuracy, the tool task turn by turn): `eval.demo`.

The directory layout is what a Hugging Face Qwen2 checkpoint has, cut down to what
`mlx_lm.load` and `transformers.AutoTokenizer` read: `config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..core.errors import UserError
from ..data.examples import arithmetic_examples

DEMO_MODEL_DIR = Path(__file__).parent.parent / "demo_model"
DEMO_TOOLS_MODEL_DIR = Path(__file__).parent.parent / "demo_tools_model"

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's pre-tokenizer split. transformers 5 rebuilds every model_type "qwen2" tokenizer
# with this regex whatever tokenizer.json says, so training with any other split would make
# transformers and the `tokenizers` library disagree. Its `\p{N}` puts each digit alone.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# ChatML, as Qwen2 writes it; the generation prompt ends in "assistant\n", so a completion
# is the answer text followed by <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_corpus(n: int = 500, seed: int = 0) -> list[str]:
    """The arithmetic task rendered as full ChatML turns: the default tokenizer corpus."""
    return [
        f"{IM_START}user\n{ex.prompt}{IM_END}\n{IM_START}assistant\n{ex.answer}{IM_END}\n"
        for ex in arithmetic_examples(n, seed=seed)
    ]


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE set up exactly as Qwen2's, so every digit is its own token.

    Single-digit tokens keep numbers' spelling uniform, so a small model can learn
    arithmetic digit by digit instead of memorising merged chunks like "48".
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # A ByteLevel decoder is also what makes mlx-lm pick its streaming BPE detokenizer.
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_model_dir(path, model: qwen2.Model, model_args: dict, tokenizer: Tokenizer) -> Path:
    """Write a Qwen2 `model` and `tokenizer` as a checkpoint directory `mlx_lm.load(path)` reads offline."""
    config = {
        **vars(qwen2.ModelArgs.from_dict({**model_args, "model_type": "qwen2"})),
        "architectures": ["Qwen2ForCausalLM"],
        "torch_dtype": "float32",
    }
    return write_model_dir(path, dict(tree_flatten(model.parameters())), config, tokenizer)


def write_model_dir(path, weights: dict, config: dict, tokenizer: Tokenizer) -> Path:
    """`config.json` (plus the tokenizer's eos/pad ids), `model.safetensors` and the tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**config, "eos_token_id": tokenizer.token_to_id(IM_END), "pad_token_id": tokenizer.token_to_id(PAD)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": config.get("max_position_embeddings", 2048),
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path


def make_tiny_model(path, texts: list[str] | None = None, hidden_size: int = 64,
                    num_hidden_layers: int = 2, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, intermediate_size: int = 128,
                    vocab_size: int = 512, seed: int = 0) -> Path:
    """A random-init float32 Qwen2 model and a BPE tokenizer trained on `texts`, saved to `path`.

    `vocab_size` caps the tokenizer; the model's vocabulary is the tokenizer's actual size
    (286 on the default corpus), so every id the model can sample decodes to text.
    """
    tokenizer = train_tokenizer(texts if texts is not None else chat_corpus(), vocab_size)
    args = dict(
        model_type="qwen2", hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, rms_norm_eps=1e-6,
        vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return save_model_dir(path, model, args, tokenizer)


def demo_model_path(tools: bool = False) -> Path:
    """The embedded demo model's directory; raises `UserError` if it was never built.

    `tools=True`: the tool demo's model (multiplication with the calculator, fenced format).
    """
    directory = DEMO_TOOLS_MODEL_DIR if tools else DEMO_MODEL_DIR
    build = "python scripts/build_demo_model.py" + (" --tools" if tools else "")
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    missing = [name for name in needed if not (directory / name).exists()]
    if missing:
        raise UserError(f"the demo model in {directory} lacks {', '.join(missing)}; build it with `{build}`")
    return directory


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """What CHAT_TEMPLATE renders, without jinja: for building training text from a bare `Tokenizer`."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
