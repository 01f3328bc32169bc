"""Fuse trained adapters into the base model and save a standalone mlx-lm model.

Reuses mlx-lm's pieces: each adapter layer's own `fuse()`, `dequantize_model`,
`save` and the GGUF writer.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_model, resolve_model_path

GGUF_MODEL_TYPES = ("llama", "mixtral", "mistral")  # what mlx-lm's GGUF writer supports


def trained_base_model(adapter_path: str | Path) -> str | None:
    """The base model a run's adapters were trained on, as the trainer recorded it; None for the demo."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None  # load_with_adapters explains what is missing
    model = json.loads(config_file.read_text()).get("model")
    return None if model in (None, "embedded-demo") else model


def load_with_adapters(model: str | None, adapter_path: str | Path | None):
    """Base model (quantized as it was in training) with the run's adapters applied.

    No `model` means the base the adapters were trained on (else the embedded demo).
    """
    from mlx_lm.tuner.utils import load_adapters

    if model is None and adapter_path is not None:
        model = trained_base_model(adapter_path)
    quantize = {}
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if not (adapter_path / ADAPTER_WEIGHTS).is_file() or not (adapter_path / ADAPTER_CONFIG).is_file():
            raise UserError(f"{adapter_path} holds no adapters ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}): point --adapter-path at a run directory")
        quantize = json.loads((adapter_path / ADAPTER_CONFIG).read_text()).get("quantized_on_load") or {}
    model_obj, tokenizer, config = load_model(
        model, quantize=bool(quantize), q_bits=quantize.get("bits", 4), q_group_size=quantize.get("group_size", 64)
    )
    if adapter_path is not None:
        load_adapters(model_obj, str(adapter_path))
    model_obj.eval()
    return model_obj, tokenizer, config


def fuse_model(model: str | None, adapter_path: str | Path, output: str | Path, dequantize: bool = False, export_gguf: bool = False) -> Path:
    from mlx_lm.utils import dequantize_model, save

    output, adapter_path = Path(output), Path(adapter_path)
    if output.resolve() == adapter_path.resolve() or adapter_path.resolve() in output.resolve().parents:
        raise UserError(f"--output {output} is inside the run directory {adapter_path}: choose a directory of its own")
    if model is None:
        model = trained_base_model(adapter_path)
    model_obj, tokenizer, config = load_with_adapters(model, adapter_path)
    if export_gguf and config.get("model_type") not in GGUF_MODEL_TYPES:
        raise UserError(
            f"GGUF export supports model types {', '.join(GGUF_MODEL_TYPES)} (mlx-lm's writer), "
            f"not {config.get('model_type')!r}: fuse without --export-gguf"
        )

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model_obj.named_modules() if hasattr(m, "fuse")]
    if fused:
        model_obj.update_modules(tree_unflatten(fused))
    if dequantize:
        model_obj = dequantize_model(model_obj)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    output.mkdir(parents=True, exist_ok=True)
    save(output, resolve_model_path(model), model_obj, tokenizer, config, donate_model=False)
    if export_gguf:
        from mlx_lm.gguf import convert_to_gguf

        weights = dict(tree_flatten(model_obj.parameters()))
        convert_to_gguf(output, weights, config, str(output / "ggml-model-f16.gguf"))
    return output
