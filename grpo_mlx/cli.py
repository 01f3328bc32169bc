"""The `grpo-mlx` command line: thin wrappers that build a config and call one function."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

import click

from . import __version__
from .core.config import EvalConfig, GenerateConfig, TrainConfig, build_config, load_config_file, value_type
from .core.errors import Interrupted, UserError
from .memory.planner import DEFAULT_PROMPT_TOKENS, PLAN_FIELDS  # planner imports MLX only inside its functions

CLICK_TYPES = {int: int, float: float}  # anything else (str, comma-separated lists) reads as text; _coerce converts


# `--help` in sections, the way click option groups show them: every option keeps its name, only its place
# in the listing changes. An option in no section is listed under "Other options" (tests/test_config.py
# checks that every TrainConfig field has one section).
OPTION_GROUPS = {
    "Model": ("model", "adapter_path", "quantize", "q_bits", "q_group_size", "lora_rank", "lora_layers", "lora_scale",
              "lora_dropout", "dora", "lora_keys"),
    "Data": ("prompt", "dataset", "dataset_config", "split", "prompt_field", "answer_field", "limit", "system_prompt",
             "max_prompt_length"),
    "Sampling": ("batch_size", "group_size", "samples", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                 "tools", "tool_sandbox", "env", "max_turns", "max_trajectory_tokens", "dynamic_sampling",
                 "max_sampling_rounds"),
    "Rewards": ("reward", "reward_weights", "scale_rewards", "reward_timeout"),
    "Loss and update": ("loss_type", "importance_level", "beta", "kl_estimator", "epsilon", "epsilon_high",
                        "mask_truncated_completions", "num_iterations", "learning_rate", "weight_decay",
                        "warmup_steps", "lr_schedule", "max_grad_norm"),
    "Memory": ("micro_batch_size", "grad_checkpoint", "memory_limit", "compile"),
    "Logging and evaluation": ("log_every", "sample_every", "report_to", "eval_every", "eval_dataset", "eval_limit"),
    "Run": ("steps", "seed", "output", "save_every", "keep_checkpoints", "resume", "overwrite", "config_path",
            "recipe", "debug"),
}


class GroupedCommand(click.Command):
    """A click command whose `--help` lists its options in the sections of OPTION_GROUPS."""

    def format_options(self, ctx, formatter):
        records = {param.name: param.get_help_record(ctx) for param in self.get_params(ctx)}
        records = {name: record for name, record in records.items() if record is not None}
        placed = set()
        for title, names in OPTION_GROUPS.items():
            rows = [records[name] for name in names if name in records]
            placed.update(names)
            if rows:
                with formatter.section(f"{title} options"):
                    formatter.write_dl(rows)
        help_option = self.get_help_option(ctx)
        rest = [record for name, record in records.items() if name not in placed and name != getattr(help_option, "name", None)]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)
        if help_option is not None:  # last, as click lists it
            with formatter.section("Help"):
                formatter.write_dl([help_option.get_help_record(ctx)])


def _config_options(kind, only=None):
    """One click option per field of a config dataclass (or of the fields named in `only`), so flags and
    config keys never drift apart.

    Every option defaults to None (not given; a --x/--no-x flag too), so a config file's value is kept under it."""
    def decorate(func):
        for f in reversed([f for f in fields(kind) if only is None or f.name in only]):
            flag = "--" + f.name.replace("_", "-")
            hint = value_type(kind, f.name)
            required = f.default is MISSING and f.default_factory is MISSING
            default = f.default_factory() if f.default_factory is not MISSING else (None if required else f.default)
            if isinstance(default, list):
                default = ",".join(map(str, default))
            help_text = f.metadata["help"] + (f" [default: {default}]" if default not in (None, "") else "")
            if hint is bool:
                option = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
            else:
                # Choices as text (older click matches text only); build_config turns "4" into the field's int.
                choices = f.metadata.get("choices")
                kind_of_value = click.Choice([str(c) for c in choices]) if choices else CLICK_TYPES.get(hint, str)
                option = click.option(flag, f.name, type=kind_of_value, required=required, help=help_text)
            func = option(func)
        return func
    return decorate


def _remember_debug(ctx, param, value):
    if ctx.obj is not None:  # main() passes a dict; it reads "debug" when an error reaches it
        ctx.obj["debug"] = value


def _debug_option(func):
    return click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_remember_debug,
                        help="Show full tracebacks.")(func)


def _config_file_option(func):
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="YAML or JSON file of options; flags override it.")(func)
    return click.option("--recipe", "recipe", default=None, metavar="NAME",
                        help="A shipped recipe (`grpo-mlx recipes`); a --config file and flags override it.")(func)


def _file_values(recipe: str | None, config_path: str | None, command: str) -> dict:
    """The values under the flags: a recipe's, then a --config file's over them."""
    from .recipes import recipe_values

    values = recipe_values(recipe, command) if recipe else {}
    return {**values, **(load_config_file(config_path) if config_path else {})}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="grpo-mlx")
def cli():
    """GRPO reinforcement learning for language models on MLX.

    Sample a group of completions per prompt, score them with reward functions,
    and update LoRA adapters with the group-relative clipped objective.
    `grpo-mlx train` alone trains the embedded demo model offline.
    """


@cli.command(cls=GroupedCommand)
@_config_file_option
@_debug_option
@_config_options(TrainConfig)
def train(config_path, recipe, **flags):
    """Train LoRA adapters with GRPO."""
    config = build_config(_file_values(recipe, config_path, "train"), flags, TrainConfig)
    from .train.runner import run_training  # MLX loads only once the config is known to be good

    run_training(config)


@cli.command()
@click.option("--model", default=None, help="Base model directory, GGUF file or hub id; unset: the embedded demo model.")
@click.option("--adapter-path", required=True, help="Run directory holding adapters.safetensors + adapter_config.json.")
@click.option("--output", required=True, help="New or empty directory for the fused model (not the run's or the base model's).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `grpo-mlx fuse` export in --output (nothing else is ever replaced).")
@click.option("--dequantize", is_flag=True, help="Write full-precision weights, for tools outside MLX.")
@click.option("--export-gguf", is_flag=True, help="Also write GGUF (llama, mistral, mixtral only).")
@_debug_option
def fuse(model, adapter_path, output, overwrite, dequantize, export_gguf):
    """Fuse adapters into the base model and save a standalone mlx-lm model."""
    from .model.fuse import fuse_model

    with _status(f"fusing adapters from {adapter_path}"):
        path = fuse_model(model, adapter_path, output, dequantize=dequantize, export_gguf=export_gguf, overwrite=overwrite)
    click.echo(f"fused model saved to {path}")


@cli.command()
@click.argument("source")
@click.argument("output")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Type of the float tensors (unquantized weights, norms, scales) [default: float16 with a GPU, "
                   "float32 on the CPU, where float16 is far slower].")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Quantize again to this many bits (GGUF: dequantize first; a Hugging Face folder: quantize).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Group size for --q-bits.")
@click.option("--dequantize", is_flag=True, help="GGUF: write the quantized blocks as --dtype floats (faster on a CPU, "
              "where MLX's quantized matmul is slow; `--model FILE.gguf` does this on a machine without a GPU).")
@_debug_option
def convert(source, output, dtype, q_bits, q_group_size, dequantize):
    """Convert a GGUF file (llama, qwen2) or a Hugging Face model folder into an mlx-lm model folder.

    GGUF Q4_0, Q4_1 and Q8_0 tensors stay quantized (MLX holds them exactly); the tokenizer and chat
    template come from the file's metadata. OUTPUT must not exist yet."""
    from .model.convert import convert as convert_model, default_dtype

    with _status(f"converting {source}"):
        path = convert_model(source, output, dtype=dtype or default_dtype(), q_bits=None if q_bits is None else int(q_bits),
                             q_group_size=int(q_group_size), dequantize=dequantize, log=lambda text: None)
    click.echo(f"converted {source} to {path}; load it with --model {path} or mlx_lm.load")


@cli.command(cls=GroupedCommand)
@_debug_option
@_config_options(GenerateConfig)
def generate(**flags):
    """Generate one completion, optionally with trained adapters."""
    import mlx.core as mx

    from .data.examples import Example
    from .data.prompts import render_prompt, resolve_system_prompt
    from .model.fuse import load_with_adapters
    from .rollout.batch import make_sampler

    c = build_config({}, flags, GenerateConfig)
    with _status("loading model"):
        model_obj, tokenizer, _ = load_with_adapters(c.model, c.adapter_path)
    tokens = render_prompt(tokenizer, Example(prompt=c.prompt, answer=None), resolve_system_prompt(c.system_prompt))
    mx.random.seed(c.seed)
    sampler = make_sampler(c.temperature, c.top_p, c.top_k, c.min_p)
    stream_completion(model_obj, tokenizer, tokens, c.max_tokens, sampler, lambda text: click.echo(text, nl=False))
    click.echo()


def stream_completion(model, tokenizer, prompt_tokens: list[int], max_tokens: int, sampler, write) -> str:
    """Decode through mlx-lm's stream_generate, handing each new piece of text to `write` as it comes
    (as `mlx_lm.generate` prints it); returns the whole completion."""
    from mlx_lm import stream_generate

    pieces = []
    for response in stream_generate(model, tokenizer, prompt_tokens, max_tokens=max_tokens, sampler=sampler):
        if response.text:
            write(response.text)
            pieces.append(response.text)
    return "".join(pieces)


def _note_multi_turn_run(config: EvalConfig) -> None:
    """A run trained with tools or an environment, evaluated with neither, scores single-turn answers: say so."""
    from pathlib import Path

    import yaml

    if config.adapter_path is None or config.tools or config.env:
        return
    run_config = Path(config.adapter_path).expanduser() / "config.yaml"
    try:
        trained = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(trained, dict):
        return
    if trained.get("tools"):
        flag = "--tools " + ",".join(trained["tools"])
        if "python" in trained["tools"] and trained.get("tool_sandbox") == "guard-only":
            flag += " --tool-sandbox guard-only"  # the run's opt-in, not taken for granted
    elif trained.get("env"):
        flag = f"--env {trained['env']}"
    else:
        return
    click.echo(f"note: {config.adapter_path} was trained with {flag}, this eval has none (single-turn answers): "
               f"add {flag} to evaluate as trained", err=True)


@cli.command(name="eval", cls=GroupedCommand)
@_config_file_option
@_debug_option
@_config_options(EvalConfig)
def eval_command(config_path, recipe, **flags):
    """Greedy accuracy, and pass@k / maj@K with --samples K, on a data set with gold answers."""
    from rich.console import Console

    from .eval.evaluate import check_result_path, evaluate, write_result
    from .eval.table import EvalProgress, summary_table

    config = build_config(_file_values(recipe, config_path, "eval"), flags, EvalConfig)
    _note_multi_turn_run(config)
    if config.output is not None:
        check_result_path(config.output)  # before the evaluation, which an unwritable path would lose
    progress = EvalProgress()
    try:
        result = evaluate(config, on_start=progress.start, on_progress=progress.advance)
    finally:
        progress.stop()
    Console().print(summary_table(result))
    if config.output is not None:
        click.echo(f"results written to {write_result(result, config.output)}")


@cli.command()
@_debug_option
def rewards():
    """List the built-in reward functions and how to add your own."""
    from .rewards.registry import list_rewards

    names = list_rewards()
    width = max(map(len, names))
    for name, description in names.items():
        click.echo(f"{name:<{width}}  {description}")
    click.echo(
        "\nPass several with --reward accuracy,format (weights: --reward-weights 1,0.5).\n"
        "Your own: --reward path/to/file.py:fn or --reward package.module:fn, called as TRL calls it,\n"
        "fn(prompts=..., completions=..., trainer_state=..., **columns), or fn(completions, answers, **fields).\n"
        "Your fn returns one float (or None) per completion; a call past --reward-timeout seconds scores None."
    )


@cli.command()
@_debug_option
def recipes():
    """List the shipped recipes: known-good setups, each with its source."""
    from .recipes import list_recipes

    entries = list_recipes()
    width = max(len(name) for name, _, _ in entries)
    for name, description, source in entries:
        click.echo(f"{name:<{width}}  {description}\n{'':<{width}}  source: {source}")
    click.echo("\nUse one with: grpo-mlx train --recipe NAME (and grpo-mlx eval --recipe NAME); "
               "a --config file and flags override its values.")


@cli.command()
@click.option("--model", required=True, help="A model directory, a GGUF file, a hub id in the Hugging Face cache, or a known "
              "shape name (grpo_mlx/shapes.py: qwen2.5-0.5b to qwen2.5-7b, llama-3.2-1b, llama-3.2-3b).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Plan the model quantized to this many bits (as train's --quantize --q-bits).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=DEFAULT_PROMPT_TOKENS, show_default=True,
              help="The longest prompt in tokens, chat template included (200: GSM8K with the R1 system prompt).")
@_debug_option
@_config_options(TrainConfig, only=PLAN_FIELDS)
def plan(model, bits, prompt_tokens, **flags):
    """Predict a training step's memory, choose its plan, and show what fits on 8-64 GB Macs (offline, no weights)."""
    from .memory.planner import plan_report

    config = build_config({}, {**flags, "model": model}, TrainConfig)
    click.echo(plan_report(model, None if bits is None else int(bits), config, prompt_tokens))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR...]")
@_debug_option
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Also write a PNG of reward, KL and completion length against step (needs grpo-mlx[plot]).")
def report(run_dirs, plot_path):
    """Summarize one or several runs side by side, from their metrics.jsonl."""
    from rich.console import Console

    from .ui.report import plot_runs, summarize_run, summary_table

    Console().print(summary_table([summarize_run(d) for d in run_dirs]))
    if plot_path is not None:
        click.echo(f"plot written to {plot_runs(run_dirs, plot_path)}")


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)


def main(argv=None):
    """Entry point: user errors, and click's usage errors, print as one line and exit 2; --debug shows the traceback."""
    state = {"debug": False}  # set by the --debug option of the command that runs
    if argv is None:  # a real command line, not a call from Python
        from .core.openblas import reexec_with_openblas

        reexec_with_openblas()
    try:
        cli.main(args=argv, prog_name="grpo-mlx", standalone_mode=False, obj=state)
    except UserError as e:
        if state["debug"]:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:  # saved and stopped on SIGINT/SIGTERM
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a bad flag or value: one line, like every other error
        command = e.ctx.command_path if e.ctx is not None else "grpo-mlx"
        click.echo(f"error: {e.format_message()} (see `{command} --help`)", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":  # `python -m grpo_mlx.cli ...` runs the CLI too, not nothing
    main()
