"""The `grpo-mlx` command line: thin wrappers that build a config and call one function."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

import click

from . import __version__
from .config import TrainConfig, build_config, load_config_file
from .errors import UserError


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
            if f.name in ("micro_batch_size",):
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
    from .trainer import run_training  # MLX loads only once the config is known to be good

    run_training(config)


def _not_yet(name: str, issue: str):
    @cli.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command():
        raise UserError(f"`grpo-mlx {name}` is not available yet ({issue}); use mlx-lm's tools meanwhile")

    command.__doc__ = f"(not available yet: {issue})"
    return command


def main(argv=None):
    """Entry point: user errors print as one line and exit 2; --debug shows the traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


for _name, _issue in (("eval", "issue 4"), ("report", "issue 5"), ("rewards", "issue 4")):
    _not_yet(_name, _issue)
