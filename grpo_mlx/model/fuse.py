"""Fuse trained adapters into the base model and save a standalone mlx-lm model.

Reuses mlx-lm's pieces: each adapter layer's own `fuse()`, `dequantize_model`,
`save` and the GGUF writer.

The export goes to a temporary folder beside `--output` and is renamed into
place only once complete, so an interrupted fuse leaves the old folder as it
was. `--overwrite` replaces only a previous export: a folder holding the
`FUSE_MARKER` file that grpo-mlx writes and nothing but the files that marker
lists. Anything else in an existing, non-empty `--output` is the user's: it is
refused, with or without `--overwrite`. The base model's own folder (or one
holding it) is always refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx.utils import tree_flatten, tree_unflatten

from ..core.atomic import staging_folder
from ..core.errors import UserError
from .policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, demo_name, load_model, resolve_model_path

GGUF_MODEL_TYPES = ("llama", "mixtral", "mistral")  # what mlx-lm's GGUF writer supports
FUSE_MARKER = "grpo_mlx_fuse.json"  # written last into each export: what --overwrite may replace


def trained_base_model(adapter_path: str | Path) -> str | None:
    """The base model a run's adapters were trained on, as the trainer recorded it; None for the demo."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None  # load_with_adapters explains what is missing
    model = json.loads(config_file.read_text()).get("model")
    return None if model in (None, demo_name(), demo_name(tools=True)) else model


def trained_on_tool_demo(adapter_path: str | Path) -> bool:
    """Whether a run's adapters were trained on the embedded tool demo model (`--tools` with no --model)."""
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    return config_file.is_file() and json.loads(config_file.read_text()).get("model") == demo_name(tools=True)


def load_with_adapters(model: str | None, adapter_path: str | Path | None, tools: bool = False):
    """Base model (quantized as it was in training) with the run's adapters applied.

    No `model` means the base the adapters were trained on (else the embedded demo; with
    `tools` and no adapters, the tool demo's model).
    """
    if model is None and adapter_path is not None:
        model = trained_base_model(adapter_path)
        tools = trained_on_tool_demo(adapter_path)
    quantize = {}
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if not (adapter_path / ADAPTER_WEIGHTS).is_file() or not (adapter_path / ADAPTER_CONFIG).is_file():
            raise UserError(f"{adapter_path} holds no adapters ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}): point --adapter-path at a run directory")
        quantize = json.loads((adapter_path / ADAPTER_CONFIG).read_text()).get("quantized_on_load") or {}
    model_obj, tokenizer, config = load_model(
        model, quantize=bool(quantize), q_bits=quantize.get("bits", 4), q_group_size=quantize.get("group_size", 64),
        tools=tools,
    )
    if adapter_path is not None:
        apply_adapters(model_obj, adapter_path, model)
    model_obj.eval()
    return model_obj, tokenizer, config


def apply_adapters(model_obj, adapter_path: Path, model: str | None) -> None:
    """mlx-lm's `load_adapters`, strict: every saved tensor must match an adapter parameter's shape.

    mlx-lm (before 0.32) loads with strict=False, so adapters from another base
    model fail later deep inside a matmul, or silently load in part.
    """
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    adapter_config = json.loads((adapter_path / ADAPTER_CONFIG).read_text())
    if adapter_config.get("fine_tune_type", "lora") != "full":
        linear_to_lora_layers(model_obj, adapter_config["num_layers"], adapter_config["lora_parameters"],
                              use_dora=adapter_config.get("fine_tune_type") == "dora")
    saved = mx.load(str(adapter_path / ADAPTER_WEIGHTS))
    params = dict(tree_flatten(model_obj.parameters()))
    missing = sorted(k for k in saved if k not in params)
    wrong = sorted(k for k in saved if k in params and params[k].shape != saved[k].shape)
    if missing or wrong:
        key = (missing or wrong)[0]
        detail = (f"the model has no parameter {key}" if missing else
                  f"{key} is {tuple(saved[key].shape)} in the adapters but {tuple(params[key].shape)} in the model")
        trained_on = adapter_config.get("model") or "embedded-demo"
        raise UserError(
            f"the adapters in {adapter_path} do not fit model {model or 'embedded-demo'} ({detail}; "
            f"{len(missing) + len(wrong)} of {len(saved)} tensors differ): they were trained on {trained_on}; "
            "pass that model with --model, or leave --model out"
        )
    model_obj.load_weights(list(saved.items()), strict=False)


def check_fuse_output(output: Path, adapter_path: Path, model: str | None, overwrite: bool) -> None:
    """Refuse, before anything loads, an --output that would hold or replace files grpo-mlx did not write."""
    target = output.resolve()
    run_dir = adapter_path.resolve()
    if target == run_dir or run_dir in target.parents:
        raise UserError(f"--output {output} is inside the run directory {adapter_path}: choose a directory of its own")
    base = Path(resolve_model_path(model, tools=model is None and trained_on_tool_demo(adapter_path))).expanduser()
    if base.is_dir() and (target == base.resolve() or target in base.resolve().parents or base.resolve() in target.parents):
        # Even with --overwrite: the run's adapters (and any other run on this base) need the base as it was.
        raise UserError(f"--output {output} is, holds or lies inside the base model's folder {base}: choose another folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {output} is a file: give a folder for the fused model")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--output {output} is not empty: choose a new folder, or pass --overwrite to replace an earlier export")
    extra = sorted(set(os.listdir(target)) - set(export_files(target)))
    if extra:
        raise UserError(
            f"--output {output} holds files grpo-mlx fuse did not write ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}): --overwrite replaces only an earlier export; choose another folder"
        )


def export_files(folder: Path) -> list[str]:
    """The files an earlier `grpo-mlx fuse` wrote into `folder`, from its marker; [] when it has none."""
    try:
        return [*json.loads((folder / FUSE_MARKER).read_text())["files"], FUSE_MARKER]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def fuse_model(model: str | None, adapter_path: str | Path, output: str | Path, dequantize: bool = False,
               export_gguf: bool = False, overwrite: bool = False) -> Path:
    from mlx_lm.utils import dequantize_model, save

    output, adapter_path = Path(output), Path(adapter_path)
    if model is None:
        model = trained_base_model(adapter_path)
    check_fuse_output(output, adapter_path, model, overwrite)
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

    target = output.resolve()
    staging = staging_folder(target, f"--output {output}")
    try:
        save(staging, resolve_model_path(model, tools=model is None and trained_on_tool_demo(adapter_path)), model_obj, tokenizer, config, donate_model=False)
        if export_gguf:
            from mlx_lm.gguf import convert_to_gguf

            weights = dict(tree_flatten(model_obj.parameters()))
            convert_to_gguf(staging, weights, config, str(staging / "ggml-model-f16.gguf"))
        marker = {"files": sorted(os.listdir(staging)), "model": model or "embedded-demo", "adapter_path": str(adapter_path)}
        (staging / FUSE_MARKER).write_text(json.dumps(marker, indent=2))
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own half-written export, never the user's folder
        raise
    return output


def _replace_folder(new: Path, target: Path) -> None:
    """Move the complete export `new` to `target`; an old `target` (checked by check_fuse_output) goes only after."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "export")
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old / "export", target)  # put the old export back
        raise
    shutil.rmtree(old)
