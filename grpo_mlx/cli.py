"""The `grpo-mlx` command line: thin wrappers that build a config and call one function."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

import click

from . import __version__
from .config import TrainConfig, build_config, field_help, load_config_file
from .errors import Interrupted, UserError


def _train_options(func):
    """One click option per TrainConfig field, so flags and config keys never drift apart."""
    for f in reversed(fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        show = f" [default: {default}]" if default not in (None, "") else ""
        if isinstance(f.default, bool):
            option = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text + show)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("epsilon_high",):
                kind = float
            if f.name in ("micro_batch_size", "max_prompt_length"):
                kind = int
            option = click.option(flag, f.name, type=kind, default=None, help=help_text + show)
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="grpo-mlx")
def cli():
    """GRPO reinforcement learning for language models on MLX.

    Sample a group of completions per prompt, score them with reward functions,
    and update LoRA adapters with the group-relative clipped objective.
    `grpo-mlx train` alone trains the embedded demo model offline.
    """


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML or JSON file of options; flags override it.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@_train_options
def train(config_path, debug, **flags):
    """Train LoRA adapters with GRPO."""
    file_values = load_config_file(config_path) if config_path else {}
    config = build_config(file_values, flags)
    from .runner import run_training  # MLX loads only once the config is known to be good

    run_training(config)


@cli.command()
@click.option("--model", default=None, help="Base model directory or hub id; unset: the embedded demo model.")
@click.option("--adapter-path", required=True, help="Run directory holding adapters.safetensors + adapter_config.json.")
@click.option("--output", required=True, help="New or empty directory for the fused model (not the run's or the base model's).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier `grpo-mlx fuse` export in --output (nothing else is ever replaced).")
@click.option("--dequantize", is_flag=True, help="Write full-precision weights, for tools outside MLX.")
@click.option("--export-gguf", is_flag=True, help="Also write GGUF (llama, mistral, mixtral only).")
def fuse(model, adapter_path, output, overwrite, dequantize, export_gguf):
    """Fuse adapters into the base model and save a standalone mlx-lm model."""
    from .fuse import fuse_model

    with _status(f"fusing adapters from {adapter_path}"):
        path = fuse_model(model, adapter_path, output, dequantize=dequantize, export_gguf=export_gguf, overwrite=overwrite)
    click.echo(f"fused model saved to {path}")


@cli.command()
@click.option("--model", default=None, help="Model directory or hub id; unset: the embedded demo model.")
@click.option("--adapter-path", default=None, help="Run directory with adapters to apply.")
@click.option("--prompt", required=True, help="The user message.")
@click.option("--system-prompt", default=None, help="System prompt: a built-in name ('r1'), text, or 'none'.")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 decodes greedily.")
def generate(model, adapter_path, prompt, system_prompt, max_tokens, temperature):
    """Generate one completion, optionally with trained adapters."""
    from mlx_lm.generate import generate as mlx_generate

    from .data import Example, render_prompt, resolve_system_prompt
    from .fuse import load_with_adapters
    from .rollout import make_sampler

    with _status("loading model"):
        model_obj, tokenizer, _ = load_with_adapters(model, adapter_path)
    tokens = render_prompt(tokenizer, Example(prompt=prompt, answer=None), resolve_system_prompt(system_prompt))
    text = mlx_generate(model_obj, tokenizer, tokens, max_tokens=max_tokens, sampler=make_sampler(temperature))
    click.echo(text)


@cli.command(name="eval")
@click.option("--model", default=None, help="Base model directory or hub id; unset: the embedded demo model.")
@click.option("--adapter-path", default=None, help="Run directory with adapters to apply; unset: the base model.")
@click.option("--dataset", default="arithmetic", show_default=True, help=field_help("dataset"))
@click.option("--dataset-config", default=None, help=field_help("dataset_config"))
@click.option("--split", default="test", show_default=True, help="Data set split to evaluate on.")
@click.option("--prompt-field", default=None, help=field_help("prompt_field"))
@click.option("--answer-field", default=None, help=field_help("answer_field"))
@click.option("--limit", default=None, type=int, help="Evaluate the first N problems; unset: the whole split.")
@click.option("--samples", default=1, show_default=True, type=int,
              help="K: completions sampled per problem for pass@k and maj@K; 1 runs greedy accuracy only.")
@click.option("--system-prompt", default=None, help=field_help("system_prompt"))
@click.option("--max-tokens", default=None, type=int, help="Maximum completion length in tokens [default: 256; demo model: 8].")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="Sampling temperature of the K samples (greedy uses 0).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help=field_help("top_p"))
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed for sampling and built-in task problems.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Prompts decoded together (each with its K samples).")
@click.option("--output", default=None, help="JSON file for the metrics, settings and per-problem completions.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def eval_command(output, debug, **settings):
    """Greedy accuracy, and pass@k / maj@K with --samples K, on a data set with gold answers."""
    from rich.console import Console

    from .evaluate import EvalProgress, check_result_path, evaluate, summary_table, write_result

    if output is not None:
        check_result_path(output)  # before the evaluation, which an unwritable path would lose
    progress = EvalProgress()
    try:
        result = evaluate(**settings, on_start=progress.start, on_progress=progress.advance)
    finally:
        progress.stop()
    Console().print(summary_table(result))
    if output is not None:
        click.echo(f"results written to {write_result(result, output)}")


@cli.command()
def rewards():
    """List the built-in reward functions and how to add your own."""
    from .rewards import list_rewards

    names = list_rewards()
    width = max(map(len, names))
    for name, description in names.items():
        click.echo(f"{name:<{width}}  {description}")
    click.echo(
        "\nPass several with --reward accuracy,format (weights: --reward-weights 1,0.5).\n"
        "Your own: --reward path/to/file.py:fn or --reward package.module:fn, where\n"
        "fn(completions, answers, **fields) returns one float (or None) per completion."
    )


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR...]")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Also write a PNG of reward, KL and completion length against step (needs grpo-mlx[plot]).")
def report(run_dirs, plot_path):
    """Summarize one or several runs side by side, from their metrics.jsonl."""
    from rich.console import Console

    from .report import plot_runs, summarize_run, summary_table

    Console().print(summary_table([summarize_run(d) for d in run_dirs]))
    if plot_path is not None:
        click.echo(f"plot written to {plot_runs(run_dirs, plot_path)}")


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)


def main(argv=None):
    """Entry point: user errors print as one line and exit 2; --debug shows the traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    if argv is None:  # a real command line, not a call from Python
        from .openblas import reexec_with_openblas

        reexec_with_openblas()
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Interrupted as e:  # saved and stopped on SIGINT/SIGTERM
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
