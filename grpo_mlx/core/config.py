"""`TrainConfig`, `EvalConfig`, `GenerateConfig`: every knob of a command, its default, help and rules.

The click options of `grpo-mlx train`, `eval` and `generate`, the keys of a YAML/JSON config file
and a run directory's `config.yaml` all derive from the dataclass fields below; the fields the
commands share (data, sampling) are written once, in SHARED. `validate()` checks every field
against its type, choices and range. Precedence: field default < embedded-demo preset (train) <
config file < command-line flag.

Defaults follow DeepSeekMath (G=8, epsilon=0.2, beta=0.04, one update per
rollout). Its learning rate, 1e-6, is for full weights; LoRA updates far fewer
parameters from a zero start, so the LoRA default here is 1e-5 (mlx-lm's LoRA
default, with its scale 20).
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .config_types import TYPE_NAMES, has_type, in_interval, interval_text, set_type, type_name  # noqa: F401 (TYPE_NAMES: the old place)
from .errors import UserError
from .presets import DEMO_PRESET, DEMO_TOOLS_PRESET

# The GRPO math's choices (grpo.py checks its arguments against them): named here, not in grpo.py,
# so that this module, and the CLI built on it, load without MLX.
SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def _opt(default, help, **rules):
    """A field with its help text and rules: `choices` (a tuple of allowed values), `range` (an interval
    like "(0, 1]", with `why` saying why where it helps) and `not_empty` (strings); validate() checks them."""
    return field(default=default, metadata={"help": help, **rules})


def _list_opt(default, help):
    return field(default_factory=lambda: list(default), metadata={"help": help})


LR_SCHEDULES = ("constant", "cosine", "linear")  # trainer.learning_rate_schedule
MAX_TURNS_DEFAULT = 4  # model turns per trajectory when --tools or --env is on and --max-turns is unset
TOOL_NAMES = ("calculator", "python")  # tools.BUILTIN_TOOLS, named here so validation needs no import of it
TOOL_SANDBOXES = ("os", "guard-only")  # sandbox.SANDBOX_MODES, likewise
TRACKER_NAMES = ("wandb", "tensorboard", "trackio", "swanlab")  # trackers.TRACKER_CLASSES, named here likewise


# Fields that train, eval and generate share: one help text and one set of rules each. A command's
# dataclass declares each with `shared(name)`, passing only what differs for it (its default, say).
SHARED = {
    "model": dict(default=None, help="Model directory, GGUF file (converted once, cached) or Hugging Face id; unset: the embedded demo model (the tool demo's with --tools)."),
    "adapter_path": dict(default=None, help="Run directory with adapters to apply; unset: the base model alone."),
    # data
    "dataset": dict(default="arithmetic", not_empty=True,
                    help="Data set: HF name, local .jsonl/.json/.parquet file or folder, or a built-in task."),
    "dataset_config": dict(default=None, help="HF data set configuration name (e.g. 'main' for openai/gsm8k)."),
    "split": dict(default="train", not_empty=True, help="Data set split to train on."),
    "prompt_field": dict(default=None, help="Field holding the prompt; auto-detected when unset."),
    "answer_field": dict(default=None, help="Field holding the gold answer; auto-detected when unset."),
    # sampling
    "system_prompt": dict(default=None, help="System prompt: a built-in name ('r1'), custom text, or 'none'."),
    "max_tokens": dict(default=256, range="[1, inf)", help="Maximum completion length in tokens."),
    "temperature": dict(default=1.0, range="[0, inf)", why="0 decodes greedily", help="Sampling temperature; 0 decodes greedily."),
    "top_p": dict(default=1.0, range="(0, 1]", why="1 disables it", help="Nucleus sampling threshold; 1 disables it."),
    "top_k": dict(default=0, range="[0, inf)", why="0 disables it", help="Top-k sampling; 0 disables it."),
    "min_p": dict(default=0.0, range="[0, 1]", why="0 disables it", help="Min-p sampling; 0 disables it."),
    "seed": dict(default=0, range="[0, 4294967295]", help="Random seed for sampling."),
    # tools and multi-turn rollouts
    "tools": dict(default=None, help="Tools the model may call mid-answer, comma-separated: calculator, python (a sandboxed "
                                     "interpreter); each rollout becomes multi-turn. Unset: none."),
    "env": dict(default=None, help="Environment plug-in answering the model's turns: path/to/file.py:Class or module:Class "
                                   "(a grpo_mlx.environments.Environment subclass). Unset: --tools alone, else single-turn."),
    "tool_sandbox": dict(default="os", choices=TOOL_SANDBOXES,
                         help="What holds --tools python's programs: os (the boundary: bubblewrap on Linux, sandbox-exec on "
                              "macOS; the tool refuses to run where it is missing) or guard-only (an opt-in: the in-process "
                              "audit hook and limits alone, not a security boundary)."),
    "max_turns": dict(default=None, range="[1, inf)",
                      help=f"Model turns per trajectory with --tools or --env; unset: {MAX_TURNS_DEFAULT}."),
    "max_trajectory_tokens": dict(default=None, range="[1, inf)",
                                  help="Tokens after the prompt per trajectory with --tools or --env, turns and observations "
                                       "together; unset: max_turns * max_tokens + 256 per observation."),
}


def shared(name: str, **changes):
    return _opt(**{**SHARED[name], **changes})


class CommandConfig:
    """Validation shared by every command's config: each field's type, finiteness, choices and range,
    then the command's own rules on combinations (`check_combinations`)."""

    command: typing.ClassVar[str]  # the grpo-mlx command this config is for

    def validate(self):
        """Reject values the command cannot run with; the message names the field."""
        hints = FIELD_TYPES_OF[type(self)]
        for f in fields(self):
            name, value, rules = f.name, getattr(self, f.name), f.metadata
            if not has_type(value, hints[name]):
                self.bad(name, f"must be {type_name(hints[name])}")
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                self.bad(name, "must be a finite number")
            if "choices" in rules and value not in rules["choices"]:
                self.bad(name, f"must be one of {', '.join(map(str, rules['choices']))}")
            if "range" in rules and value is not None and not in_interval(value, rules["range"]):
                self.bad(name, f"must be {interval_text(rules['range'])}" + (f" ({rules['why']})" if rules.get("why") else ""))
            if rules.get("not_empty") and not value.strip():
                self.bad(name, "must not be empty" + (f" ({rules['why']})" if rules.get("why") else ""))
        self.check_combinations()
        return self

    def check_combinations(self) -> None:
        """Rules between fields; none unless a command adds some."""

    def bad(self, name: str, why: str):
        raise UserError(f"invalid config value {name}={getattr(self, name)!r}: {why}")


@dataclass
class TrainConfig(CommandConfig):
    command: typing.ClassVar[str] = "train"

    # model and adapters
    model: str | None = shared("model")
    quantize: bool = _opt(False, "Quantize the base model on load (QLoRA).")
    q_bits: int = _opt(4, "Bits per weight when quantizing on load.", choices=(2, 3, 4, 5, 6, 8))  # what mx.quantize supports
    q_group_size: int = _opt(64, "Group size when quantizing on load.", choices=(32, 64, 128))
    lora_rank: int = _opt(8, "LoRA rank.", range="[1, inf)")
    lora_layers: int = _opt(16, "Number of transformer blocks, counted from the last, that get adapters; -1: all.")
    lora_scale: float = _opt(20.0, "LoRA scale (mlx-lm's convention: output += scale * x A B).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input.", range="[0, 1)", why="a dropout of 1 drops every input")
    dora: bool = _opt(False, "Use DoRA instead of LoRA.")
    lora_keys: list[str] | None = _opt(None, "Modules of each block that get adapters: all-linear, attention (q, k, v, o), or module names "
                                             "like self_attn.q_proj,mlp.down_proj, comma-separated. Unset: mlx-lm's default, every linear layer.")
    # data
    dataset: str = shared("dataset")
    dataset_config: str | None = shared("dataset_config")
    split: str = shared("split")
    prompt_field: str | None = shared("prompt_field")
    answer_field: str | None = shared("answer_field")
    system_prompt: str | None = shared("system_prompt")
    max_prompt_length: int | None = _opt(None, "Prompts longer than this many tokens are skipped and counted; unset: the model's context length (max_position_embeddings) less --max-tokens.")
    # rollout
    batch_size: int = _opt(4, "Prompts per step.", range="[1, inf)")
    group_size: int = _opt(8, "Completions sampled per prompt (G).", range="[2, inf)",
                           why="group-relative advantages need at least 2 completions per prompt")
    max_tokens: int = shared("max_tokens")
    temperature: float = shared("temperature", range="(0, inf)", why="sampling needs a tempered distribution",
                                help="Sampling temperature; log-probs use the same tempered policy.")
    top_p: float = shared("top_p")
    top_k: int = shared("top_k")
    min_p: float = shared("min_p")
    tools: list[str] | None = shared("tools")
    tool_sandbox: str = shared("tool_sandbox")
    env: str | None = shared("env")
    max_turns: int | None = shared("max_turns")
    max_trajectory_tokens: int | None = shared("max_trajectory_tokens")
    dynamic_sampling: bool = _opt(False, "DAPO: drop groups whose rewards are all equal and sample more prompts.")
    max_sampling_rounds: int = _opt(3, "Extra sampling rounds allowed per step with --dynamic-sampling.", range="[0, inf)")
    # rewards
    reward: list[str] = _list_opt(["accuracy"], "Reward functions: built-in names, file.py:fn or module:fn, comma-separated.")
    reward_weights: list[float] | None = _opt(None, "Weights of the reward functions, comma-separated; default all 1.")
    scale_rewards: str = _opt("group", "Advantage scaling: group std, batch std, or none (Dr. GRPO).", choices=SCALES)
    # 30 s: one call scores a whole batch, and a slow symbolic check stays within it (math-verify's own is 5 s a row).
    reward_timeout: float = _opt(30.0, "Seconds a reward call may run before it is cut off: its rows then score None, counted as rewards/<name>/timeouts.",
                                 range="(0, inf)")
    # objective
    loss_type: str = _opt("grpo", "Loss normalisation: grpo, bnpo, dr_grpo or dapo.", choices=LOSS_TYPES)
    importance_level: str = _opt("token", "Importance ratio per token, or per sequence (GSPO).", choices=IMPORTANCE_LEVELS)
    beta: float = _opt(0.04, "KL penalty coefficient; 0 skips the reference pass entirely.", range="[0, inf)",
                       why="0 turns the KL penalty off")
    kl_estimator: str = _opt("k3", "KL estimator: k1, k2 or k3.", choices=KL_ESTIMATORS)
    epsilon: float = _opt(0.2, "Clip range below 1 (and above, unless --epsilon-high is set).", range="(0, 1)")
    epsilon_high: float | None = _opt(None, "Clip range above 1 (DAPO clip-higher, e.g. 0.28).", range="(0, inf)")
    mask_truncated_completions: bool = _opt(False, "DAPO: completions cut at max tokens leave the loss.")
    # optimisation
    steps: int = _opt(200, "Training steps (one rollout each).", range="[1, inf)")
    learning_rate: float = _opt(1e-5, "AdamW learning rate.", range="(0, inf)")
    weight_decay: float = _opt(0.0, "AdamW weight decay.", range="[0, inf)")
    warmup_steps: int = _opt(0, "Linear learning-rate warm-up: step k <= N trains at learning_rate * k / N.", range="[0, inf)",
                             why="0 disables warm-up")
    lr_schedule: str = _opt("constant", "Learning rate after the warm-up: constant, or cosine / linear decay to 0 at the end of --steps.",
                            choices=LR_SCHEDULES)
    max_grad_norm: float = _opt(1.0, "Clip the gradient's global norm to this; 0 disables it.", range="[0, inf)",
                                why="0 disables clipping")
    num_iterations: int = _opt(1, "Updates per rollout (mu); mu > 1 stores old log-probs.", range="[1, inf)")
    micro_batch_size: int | None = _opt(None, "Completions per forward/backward; gradients accumulate to the same update. Unset: the memory planner's choice (whole groups where they fit).", range="[1, inf)")
    grad_checkpoint: bool | None = _opt(None, "Recompute activations in the backward pass to save memory (about 1/3 more compute). Unset: the memory planner turns it on only when the step would not fit --memory-limit without it; --no-grad-checkpoint forbids it.")
    memory_limit: float | None = _opt(None, "Memory budget in GB (10^9 bytes) that the planner fits the step into and MLX is held to. Unset: the GPU's recommended working set on a Mac, else 75% of physical memory.", range="(0, inf)")
    compile: bool = _opt(False, "Compile the loss and gradient step with mx.compile.")
    seed: int = shared("seed", help="Random seed for data order, sampling and adapters.")
    # run directory
    output: str = _opt("runs/latest", "Run directory: adapters, checkpoints, metrics.jsonl, config.yaml.", not_empty=True,
                       why="an empty --output would write into the current folder")
    save_every: int = _opt(10, "Save adapters and a checkpoint every N steps.", range="[1, inf)")
    keep_checkpoints: int = _opt(3, "Checkpoints to keep.", range="[1, inf)")
    resume: bool = _opt(False, "Continue the run in --output from its latest checkpoint (command line only).")
    overwrite: bool = _opt(False, "Replace the run in --output, once the new one has loaded (command line only).")
    log_every: int = _opt(1, "Print a metrics line every N steps when not on a terminal.", range="[1, inf)")
    sample_every: int = _opt(5, "Show and save a sampled prompt and completions every N steps.", range="[1, inf)")
    # experiment trackers and evaluation during training (trackers.py, heldout.py)
    report_to: list[str] | None = _opt(None, f"Experiment trackers to report metrics, config and sampled completions to, comma-separated: {', '.join(TRACKER_NAMES)} (each an extra: pip install \"grpo-mlx[wandb]\"). Unset: none.")
    eval_every: int = _opt(0, "Greedy accuracy on a held-out set every N steps (eval/accuracy); the best step's adapters are kept in best/. 0: off.",
                           range="[0, inf)", why="0 turns evaluation off")
    eval_dataset: str | None = _opt(None, "Held-out data set for --eval-every (its test split, else validation; a file: all of it). Unset: the training data set's test or validation split.")
    eval_limit: int = _opt(200, "Problems evaluated each time: the first N of the held-out set, the same every time.", range="[1, inf)")

    def check_combinations(self) -> None:
        if not self.reward:
            self.bad("reward", "name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            self.bad("reward_weights", f"give one weight per reward function ({len(self.reward)}: {', '.join(self.reward)})")
        if self.resume and self.overwrite:
            self.bad("overwrite", "--resume and --overwrite exclude each other")
        check_multi_turn(self)
        unknown = [name for name in self.report_to or [] if name not in TRACKER_NAMES]
        if unknown:
            self.bad("report_to", f"unknown tracker {unknown[0]!r}: use {', '.join(TRACKER_NAMES)}, comma-separated")


@dataclass
class EvalConfig(CommandConfig):
    command: typing.ClassVar[str] = "eval"

    model: str | None = shared("model", help="Base model directory, GGUF file or hub id; unset: the base model the adapters were trained on, else the embedded demo model.")
    adapter_path: str | None = shared("adapter_path")
    dataset: str = shared("dataset", help=SHARED["dataset"]["help"] + " With --tools and no --model: multiplication, the tool demo's task.")
    dataset_config: str | None = shared("dataset_config")
    split: str = shared("split", default="test", help="Data set split to evaluate on.")
    prompt_field: str | None = shared("prompt_field")
    answer_field: str | None = shared("answer_field")
    limit: int | None = _opt(None, "Evaluate the first N problems; unset: the whole split.", range="[1, inf)")
    samples: int = _opt(1, "K: completions sampled per problem for pass@k and maj@K; 1 runs greedy accuracy only.",
                        range="[1, inf)", why="1 runs greedy accuracy only")
    system_prompt: str | None = shared("system_prompt")
    max_tokens: int | None = shared("max_tokens", default=None, help=f"Maximum completion length in tokens; unset: {SHARED['max_tokens']['default']}, or {DEMO_PRESET['max_tokens']} for the embedded demo model ({DEMO_TOOLS_PRESET['max_tokens']} a turn for the tool demo's).")
    temperature: float = shared("temperature", help="Sampling temperature of the K samples (greedy accuracy uses 0).")
    top_p: float = shared("top_p")
    top_k: int = shared("top_k")
    min_p: float = shared("min_p")
    seed: int = shared("seed", help="Random seed for sampling and built-in task problems.")
    batch_size: int = _opt(8, "Prompts decoded together (each with its K samples).", range="[1, inf)")
    tools: list[str] | None = shared("tools")
    tool_sandbox: str = shared("tool_sandbox")
    env: str | None = shared("env")
    max_turns: int | None = shared("max_turns")
    max_trajectory_tokens: int | None = shared("max_trajectory_tokens")
    output: str | None = _opt(None, "JSON file for the metrics, settings and per-problem completions.")

    def check_combinations(self) -> None:
        if self.samples > 1 and self.temperature <= 0:
            self.bad("temperature", "sampling K > 1 completions (--samples) needs a temperature > 0")
        check_multi_turn(self)


def multi_turn(config) -> bool:
    """Whether a train or eval config's rollouts are multi-turn: --tools or --env given."""
    return bool(config.tools) or config.env is not None


def turn_limit(config) -> int:
    """--max-turns, or its default."""
    return config.max_turns if config.max_turns is not None else MAX_TURNS_DEFAULT


OBSERVATION_ALLOWANCE = 256  # tokens per observation between turns, in the default trajectory bound


def default_trajectory_tokens(max_tokens: int, max_turns: int) -> int:
    """The default bound on a trajectory's tokens after the prompt: every turn at its longest,
    and OBSERVATION_ALLOWANCE tokens for each observation between turns."""
    return max_turns * max_tokens + (max_turns - 1) * OBSERVATION_ALLOWANCE


def trajectory_tokens(config) -> int:
    """The bound on a multi-turn trajectory's tokens after the prompt: --max-trajectory-tokens or its default."""
    if config.max_trajectory_tokens is not None:
        return config.max_trajectory_tokens
    return default_trajectory_tokens(config.max_tokens, turn_limit(config))


def check_multi_turn(config) -> None:
    """The rules of --tools, --env, --max-turns and --max-trajectory-tokens (train and eval)."""
    unknown = [name for name in config.tools or [] if name not in TOOL_NAMES]
    if unknown:
        config.bad("tools", f"unknown tool {unknown[0]!r}: use {' or '.join(TOOL_NAMES)}, comma-separated")
    if config.env is not None and (":" not in config.env or not config.env.rpartition(":")[2].strip()):
        config.bad("env", "write it as path/to/file.py:Class or package.module:Class")
    if not multi_turn(config):
        for name in ("max_turns", "max_trajectory_tokens"):
            if getattr(config, name) is not None:
                config.bad(name, "only applies to multi-turn rollouts: add --tools or --env, or drop it")
        return
    # (eval's unset --max-tokens depends on the model: checked where it is known, by the rollout's own bound)
    if None not in (config.max_trajectory_tokens, config.max_tokens) and config.max_trajectory_tokens < config.max_tokens:
        config.bad("max_trajectory_tokens", f"must be at least --max-tokens ({config.max_tokens}), the bound of one turn")


@dataclass
class GenerateConfig(CommandConfig):
    command: typing.ClassVar[str] = "generate"

    prompt: str = _opt(MISSING, "The user message.")
    model: str | None = shared("model", help="Model directory, GGUF file or hub id; unset: the base model the adapters were trained on, else the embedded demo model.")
    adapter_path: str | None = shared("adapter_path")
    system_prompt: str | None = shared("system_prompt")
    max_tokens: int = shared("max_tokens")
    temperature: float = shared("temperature", default=0.0)
    top_p: float = shared("top_p")
    top_k: int = shared("top_k")
    min_p: float = shared("min_p")
    seed: int = shared("seed")


COMMAND_CONFIGS = (TrainConfig, EvalConfig, GenerateConfig)

# Every field's declared type (`str | None`, `list[float]`, ...), read once per command's config.
FIELD_TYPES_OF = {kind: {f.name: typing.get_type_hints(kind)[f.name] for f in fields(kind)} for kind in COMMAND_CONFIGS}


def value_type(kind: type, name: str):
    """The type a field of config class `kind` holds when set."""
    return set_type(FIELD_TYPES_OF[kind][name])


# Flags that act once on the run directory: never written to a run's config.yaml nor read from a config file,
# so reusing a run's config.yaml cannot replay them.
ONE_SHOT_ACTIONS = ("resume", "overwrite")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict of a command's config fields."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the --config path")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # the parsers' own messages say where
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}".replace("\n", " "))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    values = {k.replace("-", "_"): v for k, v in data.items()}
    for key in ONE_SHOT_ACTIONS:
        value = values.pop(key, None)
        if _coerce_scalar(bool, value) is True:
            raise UserError(f"config file {path} sets {key}: true; {key} acts once, so a config file cannot set it: pass --{key} on the command line")
    return values


# Fields naming a file or folder: a leading ~ means the home folder.
PATH_FIELDS = {"model", "adapter_path", "dataset", "output"}


def build_config(file_values: dict | None = None, flag_values: dict | None = None, kind: type = TrainConfig):
    """A validated `kind` (TrainConfig, EvalConfig, GenerateConfig) from defaults, the demo preset (train
    without --model), a config file and flags, later sources winning (None = not given)."""
    hints = FIELD_TYPES_OF[kind]
    values: dict = {}
    for source in (file_values or {}, flag_values or {}):
        for key, value in source.items():
            if key not in hints:
                raise UserError(f"unknown config option {key!r}: see `grpo-mlx {kind.command} --help` for the options")
            if value is not None:
                values[key] = _coerce(key, hints[key], value)
    for key in PATH_FIELDS & values.keys():  # "~/runs/x" is the home folder, as in a shell
        if isinstance(values[key], str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
    if kind is TrainConfig and values.get("model") is None:  # --tools picks the tool demo
        for key, value in (DEMO_TOOLS_PRESET if values.get("tools") else DEMO_PRESET).items():
            values.setdefault(key, value)
    if kind is EvalConfig and values.get("model") is None and values.get("tools"):  # the tool demo's task
        values.setdefault("dataset", DEMO_TOOLS_PRESET["dataset"])
    for f in fields(kind):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
            raise UserError(f"{f.name} is not set: pass --{f.name.replace('_', '-')}")
    return kind(**values).validate()


def _coerce(name: str, hint, value):
    """Turn what YAML/JSON or click give (strings, lists, scalars) into the field's declared type
    where that is unambiguous; anything else is left as it is for `validate` to refuse by type."""
    kind = set_type(hint)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(kind)
            return [_coerce_scalar(item, v) for v in value]
        return value
    if name == "system_prompt" and isinstance(value, str) and value.lower() in ("none", "null"):
        return "none"
    return _coerce_scalar(kind, value)


def _coerce_scalar(kind, value):
    if isinstance(value, bool):
        return value
    if kind in (int, float) and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 10.0 or "1e3" counts
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is bool and isinstance(value, str):
        return {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}.get(value.strip().lower(), value)
    return value


def config_to_dict(config: TrainConfig) -> dict:
    return asdict(config)
