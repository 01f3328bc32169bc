"""The memory plan of a training step: micro-batch size, gradient checkpointing and logits chunking
for a memory budget, chosen before the model loads.

`memory.estimate_step` predicts a step's peak memory for one choice from the model's config.json
and the run's settings. The planner tries every candidate choice, keeps those whose predicted peak
fits the budget, and takes the one `plan_cost` calls fastest. When none fits it refuses with one
line naming what would fit (fewer completion tokens, a smaller group or batch, a 4-bit model), each
found by the same estimator. `fits_table` turns the same search around: what fits on a Mac of
8 to 64 GB.

GB here is 10^9 bytes, as `peak_memory_gb` in the metrics; a Mac's memory size (16 GB) is its
marketed size, 2^30 bytes per GB.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import multi_turn, trajectory_tokens
from ..core.errors import UserError
from .estimate import ModelShape, StepShape, estimate_step

GB = 1e9
# Off a Mac nothing reports a working set: the budget is this share of physical memory, leaving the
# rest to the OS, the data set and the Python process (mx.get_peak_memory counts MLX arrays only).
HOST_MEMORY_SHARE = 0.75
# Rows x positions per chunk of the LM head in the log-prob passes, when the plan chunks the logits:
# a chunk is this many [V] rows of logits whatever the micro-batch (positions = this / micro-batch rows).
LOGITS_CHUNK_ROWS = 512


@dataclass(frozen=True)
class Plan:
    """One step's memory plan: the chosen StepShape and its predicted peaks (`memory.estimate_step`)."""

    step: StepShape  # the run's settings with the planner's micro_batch_size, grad_checkpoint, logits_chunk
    phases: dict  # estimate_step's bytes: weights, adapters, rollout, reference, policy, peak
    budget: int  # bytes

    @property
    def micro_batch_size(self) -> int:
        return self.step.micro_batch_size

    @property
    def grad_checkpoint(self) -> bool:
        return self.step.grad_checkpoint

    @property
    def logits_chunk(self) -> int | None:
        return self.step.logits_chunk

    @property
    def peak(self) -> int:
        return self.phases["peak"]

    def describe(self) -> str:
        """One line for the start-up log and config.yaml."""
        rows, group_size = self.step.batch_size * self.step.group_size, self.step.group_size
        if self.micro_batch_size % group_size == 0:
            groups = f"{self.micro_batch_size // group_size} whole group(s)"
        else:
            groups = "part of a group"
        chunk = f"logits in chunks of {self.logits_chunk} positions" if self.logits_chunk else "logits all at once"
        return (f"micro-batch {self.micro_batch_size} of {rows} rows ({groups}), "
                f"gradient checkpointing {'on' if self.grad_checkpoint else 'off'}, {chunk}; "
                f"predicted peak {self.peak / GB:.2f} GB of a {self.budget / GB:.2f} GB budget")


# ---------------------------------------------------------------- the budget


def default_budget() -> tuple[int, str]:
    """(bytes, where the number comes from): the GPU's recommended working set on a Mac (what mlx-lm's
    generation wires), else HOST_MEMORY_SHARE of physical memory."""
    import mlx.core as mx

    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set:
        return int(working_set), "the GPU's recommended working set"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(physical * HOST_MEMORY_SHARE), f"{HOST_MEMORY_SHARE:.0%} of physical memory"


def mac_budget(memory_gb: int) -> int:
    """The working set macOS recommends to the GPU on a Mac with `memory_gb` GB: about two thirds of
    its memory up to 32 GB, three quarters above (as Apple silicon Macs report it: 16 GB -> 10.7 GiB)."""
    share = 2 / 3 if memory_gb <= 32 else 3 / 4
    return int(memory_gb * 2**30 * share)


# ---------------------------------------------------------------- choosing


# The cost model, in "one token through the model forward" units; it only has to rank plans:
# - the reference pass is one forward (beta > 0); the policy pass a forward and a backward, which
#   costs about two forwards: 3; gradient checkpointing recomputes the forward in the backward:
#   one more, +1/3 of the policy pass;
# - whole-group micro-batches run each prompt once per pass; a micro-batch holding part of a group
#   runs that group's prompt once more for each part (and is tried only when no whole group fits);
# - each micro-batch is one more call per pass, which reads every weight once and waits for the
#   result: priced as CALL_COST_TOKENS tokens of forward;
# - chunking the logits adds a small fraction per chunk (smaller matmuls, more launches).
CALL_COST_TOKENS = 64
CHUNK_COST = 0.005
# A plan up to this much dearer than the fastest (by plan_cost) is taken when its predicted peak is lower
# by at least PLAN_MEMORY_GAIN of the fastest's.
PLAN_COST_SLACK = 0.05
PLAN_MEMORY_GAIN = 0.10
# A plan is accepted when its predicted peak fits the budget less this share: the estimate has run up to
# 10.6% under the measured peak (scripts/memory_check.txt), and the budget is a limit, not a target.
PLAN_HEADROOM = 0.10


def usable(budget: int) -> int:
    """The bytes of `budget` a plan's predicted peak may take (PLAN_HEADROOM kept for the estimate's error)."""
    return int(budget * (1 - PLAN_HEADROOM))


def plan_cost(step: StepShape) -> float:
    """A plan's relative time for the step's log-prob passes (lower is faster); see above."""
    rows = step.batch_size * step.group_size
    micro_batches = -(-rows // step.micro_batch_size)
    if not step.shared_prompt:
        prompt_runs = rows
    elif step.micro_batch_size % step.group_size == 0:
        prompt_runs = step.batch_size
    else:  # groups cut in parts: each part runs its prompt (a part may also join two groups: counted once)
        prompt_runs = max(micro_batches, step.batch_size)
    tokens = prompt_runs * step.prompt_tokens + rows * step.max_tokens
    passes = (1 if step.reference_pass else 0) + 3 + (1 if step.grad_checkpoint else 0)
    chunks = -(-step.max_tokens // step.logits_chunk) if step.logits_chunk else 0
    return passes * (tokens + micro_batches * CALL_COST_TOKENS) * (1 + CHUNK_COST * chunks)


def micro_batch_candidates(batch_size: int, group_size: int) -> list[int]:
    """Micro-batch sizes worth trying: whole groups (k x G, the smallest k for each number of
    micro-batches), then parts of one group (ceil(G / j) rows), used only when one group does not fit."""
    whole = {-(-batch_size // m) * group_size for m in range(1, batch_size + 1)}
    parts = {-(-group_size // j) for j in range(2, group_size + 1)}
    return sorted(whole | parts, reverse=True)


def candidate_steps(step: StepShape, micro_batch_size: int | None, grad_checkpoint: bool | None) -> list[StepShape]:
    """Every plan the user's fixed choices leave open, as StepShapes."""
    rows = step.batch_size * step.group_size
    sizes = [min(micro_batch_size, rows)] if micro_batch_size else micro_batch_candidates(step.batch_size, step.group_size)
    checkpointing = [grad_checkpoint] if grad_checkpoint is not None else [False, True]
    return [replace(step, micro_batch_size=size, grad_checkpoint=ckpt, logits_chunk=chunk)
            for size in sizes for ckpt in checkpointing for chunk in [None, *logits_chunks(step.max_tokens, size)]]


def logits_chunk_size(micro_batch_size: int) -> int:
    """Positions per LM-head chunk for a micro-batch: about LOGITS_CHUNK_ROWS rows of logits at once."""
    return max(1, LOGITS_CHUNK_ROWS // micro_batch_size)


def logits_chunks(max_tokens: int, micro_batch_size: int) -> list[int]:
    """The chunked candidate, where a chunk is shorter than a completion."""
    chunk = logits_chunk_size(micro_batch_size)
    return [chunk] if chunk < max_tokens else []


def choose_plan(model: ModelShape, step: StepShape, budget: int, micro_batch_size: int | None = None,
                grad_checkpoint: bool | None = None, estimate=estimate_step, quantize_flag: str = "--quantize") -> Plan:
    """The fastest plan (`plan_cost`) whose predicted peak fits `budget` bytes.

    `step`: the run's settings; its micro_batch_size, grad_checkpoint and logits_chunk are what the
    planner chooses, and are ignored. `micro_batch_size` / `grad_checkpoint`: the user's fixed
    choices (None: the planner's). Raises UserError, naming what would fit, when nothing does;
    `quantize_flag` is how the command asks for a 4-bit model.
    """
    best = _best_plan(model, step, budget, micro_batch_size, grad_checkpoint, estimate)
    if best is not None:
        return best
    raise UserError(refusal(model, step, budget, micro_batch_size, grad_checkpoint, estimate, quantize_flag))


def _best_plan(model, step, budget, micro_batch_size, grad_checkpoint, estimate) -> Plan | None:
    """Whole groups first (their prompts run once per pass: `candidate_steps` cuts a group only when no
    whole group fits, even checkpointed), then the lowest plan_cost, then the larger micro-batch."""
    fitting = []
    for candidate in candidate_steps(step, micro_batch_size, grad_checkpoint):
        phases = estimate(model, candidate)
        if phases["peak"] <= usable(budget):
            cuts_groups = step.shared_prompt and candidate.micro_batch_size % step.group_size != 0 \
                and candidate.micro_batch_size < step.batch_size * step.group_size
            fitting.append((cuts_groups, plan_cost(candidate), -candidate.micro_batch_size, candidate, phases))
    if not fitting:
        return None
    # Memory is worth a little time: among the plans within PLAN_COST_SLACK of the fastest, the leanest
    # (a 135M model's step held 11.9 GB in one micro-batch, 3.4 GB in four, for ~2% more by plan_cost).
    fastest = min(fitting, key=lambda f: f[:3])
    near = [f for f in fitting if f[0] == fastest[0] and f[1] <= fastest[1] * (1 + PLAN_COST_SLACK)]
    leanest = min(near, key=lambda f: (f[4]["peak"], f[1], f[2]))
    saved = fastest[4]["peak"] - leanest[4]["peak"]
    *_, chosen, phases = leanest if saved >= PLAN_MEMORY_GAIN * fastest[4]["peak"] else fastest
    return Plan(chosen, phases, int(budget))


def smallest_plan(model: ModelShape, step: StepShape, micro_batch_size=None, grad_checkpoint=None,
                  estimate=estimate_step) -> tuple[StepShape, dict]:
    """(the candidate with the lowest predicted peak, its phases): what a refusal reports."""
    scored = [(estimate(model, s), s) for s in candidate_steps(step, micro_batch_size, grad_checkpoint)]
    phases, chosen = min(scored, key=lambda x: x[0]["peak"])
    return chosen, phases


def refusal(model, step, budget, micro_batch_size, grad_checkpoint, estimate, quantize_flag) -> str:
    """The one-line refusal: the predicted minimum against the budget, and the changes that fit."""
    def fits(m=model, s=step, mb=micro_batch_size, ckpt=grad_checkpoint) -> bool:
        return _best_plan(m, s, budget, mb, ckpt, estimate) is not None

    fixes = []
    if micro_batch_size is not None and fits(mb=None):
        fixes.append("without --micro-batch-size")
    if grad_checkpoint is False and fits(ckpt=None):
        fixes.append("without --no-grad-checkpoint")
    tokens = _largest(lambda t: fits(s=replace(step, max_tokens=t)), step.max_tokens - 1)
    if tokens:
        fixes.append(f"--max-tokens {tokens}")
    group = next((g for g in range(step.group_size - 1, 1, -1) if fits(s=replace(step, group_size=g))), None)
    if group:
        fixes.append(f"--group-size {group}")
    batch = next((b for b in range(step.batch_size - 1, 0, -1) if fits(s=replace(step, batch_size=b))), None)
    if batch:
        fixes.append(f"--batch-size {batch}")
    if (model.bits is None or model.bits > 4) and fits(m=replace(model, bits=4)):
        fixes.append(f"a 4-bit model ({quantize_flag})")
    _, least = smallest_plan(model, step, micro_batch_size, grad_checkpoint, estimate)
    if fixes:
        advice = ("it would fit with " if len(fixes) == 1 else "it would fit with any one of: ") + ", ".join(fixes)
    else:
        advice = f"the weights alone take {least['weights'] / GB:.2f} GB: a smaller model, or a larger --memory-limit"
    return (f"this step needs at least {least['peak'] / GB:.2f} GB (predicted), more than the "
            f"{usable(budget) / GB:.2f} GB a plan may take of the {budget / GB:.2f} GB budget (--memory-limit, "
            f"less {PLAN_HEADROOM:.0%} for the prediction's error); {advice}")


def _largest(fits, high: int) -> int | None:
    """The largest n in 1..high with fits(n), assuming fits is monotone; None if even 1 does not."""
    if high < 1 or not fits(1):
        return None
    low = 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


# ---------------------------------------------------------------- a training run's plan


def memory_budget(memory_limit: float | None) -> tuple[int, str]:
    """(bytes, where the number comes from): --memory-limit GB, else `default_budget`."""
    if memory_limit is not None:
        return round(memory_limit * GB), "--memory-limit"
    return default_budget()


def train_step_shape(config, prompt_tokens: int, batch_size: int, shared_prompt: bool = True,
                     shortest_prompt: int | None = None) -> StepShape:
    """The StepShape of a TrainConfig with `batch_size` prompts on this rank; the planner fills in the rest."""
    # A multi-turn trajectory (turns and observations) is scored as one completion after the prompt.
    after_prompt = trajectory_tokens(config) if multi_turn(config) else config.max_tokens
    return StepShape(batch_size=batch_size, group_size=config.group_size, prompt_tokens=prompt_tokens,
                     max_tokens=after_prompt, micro_batch_size=1, shared_prompt=shared_prompt,
                     reference_pass=config.beta != 0, lora_rank=config.lora_rank, lora_layers=config.lora_layers,
                     shortest_prompt=shortest_prompt, trimmed=not getattr(config, "compile", False))


def plan_training(config, model_config: dict, prompt_tokens: int, batch_size: int, shared_prompt: bool = True,
                  estimate=estimate_step, shortest_prompt: int | None = None) -> Plan:
    """The plan of a `grpo-mlx train` run (a TrainConfig) from its model's config.json; refuses when nothing fits.

    `shortest_prompt`: the data's shortest prompt in tokens. A micro-batch's completion call runs from its
    shortest prompt's end to the batch's longest row, so the plan holds for the longest and the shortest
    prompt meeting in one step (SmolLM2, GSM8K prompts of 133-160 tokens: planned without it 24% under)."""
    model = model_shape(model_config, config.q_bits if config.quantize else None, config.q_group_size)
    budget, _ = memory_budget(config.memory_limit)
    step = train_step_shape(config, prompt_tokens, batch_size, shared_prompt, shortest_prompt)
    return choose_plan(model, step, budget, config.micro_batch_size, config.grad_checkpoint, estimate)


def apply_memory_limit(budget: int) -> None:
    """Hold MLX to the budget; on a Mac also wire that much (at most the recommended working set), as
    mlx-lm's generation wires the recommended size, so the weights are not paged out mid-step."""
    import mlx.core as mx

    mx.set_memory_limit(budget)
    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set and mx.metal.is_available():
        mx.set_wired_limit(min(budget, int(working_set)))


# ---------------------------------------------------------------- what fits


MEMORY_SIZES_GB = (8, 16, 24, 32, 64)
# The table's grid: GRPO's usual group sizes and completion lengths from short answers to long reasoning.
TABLE_GROUP_SIZES = (4, 8, 16)
TABLE_MAX_TOKENS = (256, 512, 1024, 2048, 4096)


def fits_table(model: ModelShape, step: StepShape, batch_sizes=range(1, 9), memory_sizes=MEMORY_SIZES_GB,
               estimate=estimate_step) -> dict:
    """{(memory_gb, B): (G, T, its plan checkpoints) or None}: on a Mac of memory_gb (budget `mac_budget`),
    the largest G x T of the grid (the larger G on a tie) whose step fits with some plan at B prompts
    per step, the rest of `step` kept."""
    table = {}
    for memory_gb in memory_sizes:
        budget = mac_budget(memory_gb)
        for b in batch_sizes:
            fitting = []
            for g in TABLE_GROUP_SIZES:
                for t in TABLE_MAX_TOKENS:
                    plan = _best_plan(model, replace(step, batch_size=b, group_size=g, max_tokens=t), budget,
                                      None, None, estimate)
                    if plan is not None:
                        fitting.append((g * t, g, t, plan.grad_checkpoint))
            table[memory_gb, b] = max(fitting)[1:] if fitting else None
    return table


def format_fits_table(table: dict) -> str:
    """Rows B, columns memory sizes; a cell G x T (* when its plan needs gradient checkpointing), or '-'
    when nothing on the grid fits."""
    def cell(fit):
        return "-" if fit is None else f"{fit[0]} x {fit[1]}" + ("*" if fit[2] else "")

    memory_sizes = sorted({m for m, _ in table})
    batch_sizes = sorted({b for _, b in table})
    header = ["B"] + [f"{m} GB Mac ({mac_budget(m) / GB:.1f})" for m in memory_sizes]
    rows = [[str(b)] + [cell(table[m, b]) for m in memory_sizes] for b in batch_sizes]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(text.rjust(w) for text, w in zip(r, widths)) for r in [header] + rows)


# ---------------------------------------------------------------- the model's shape


def read_model_config(model: str) -> dict:
    """config.json of a local model directory, a GGUF file (converted once) or a hub id already in the Hugging
    Face cache; never downloads."""
    from ..model.policy import is_gguf_path, resolve_model_path

    model = resolve_model_path(model) if is_gguf_path(model) else model
    local = Path(model).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model {model!r} not found: give a model directory holding config.json or a hub id in the "
                        "Hugging Face cache")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if not isinstance(cached, str):
        raise UserError(f"hub model {model!r} is not in the Hugging Face cache: download it once (e.g. with "
                        "`grpo-mlx train` or `huggingface-cli download`), or give a local directory")
    return json.loads(Path(cached).read_text())


def model_shape(config: dict, quantize_bits: int | None = None, quantize_group_size: int = 64) -> ModelShape:
    """The ModelShape of a config.json; quantized to `quantize_bits` (as on load) unless it already is."""
    try:
        shape = ModelShape.from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot plan memory for this model: its config.json lacks {e} (a field the memory model needs)")
    if quantize_bits is not None and shape.bits is None:
        shape = replace(shape, bits=quantize_bits, group_size=quantize_group_size)
    return shape


def format_phases(phases: dict) -> str:
    """The predicted bytes per phase, one line each, in GB."""
    names = [("weights", "weights"), ("adapters", "adapters + optimizer"), ("rollout", "rollout peak"),
             ("reference", "reference pass peak"), ("policy", "policy pass peak"), ("peak", "step peak")]
    return "\n".join(f"  {label:<22}{phases[key] / GB:8.2f} GB" for key, label in names if key in phases)


# ---------------------------------------------------------------- grpo-mlx plan

# The fields of TrainConfig that `grpo-mlx plan` reads; the rest do not change a step's memory.
PLAN_FIELDS = ("batch_size", "group_size", "max_tokens", "micro_batch_size", "grad_checkpoint", "beta", "lora_rank",
               "lora_layers", "memory_limit")
# --prompt-tokens' default: a GSM8K question (~55 tokens on average, ~230 at most) with the R1 system prompt
# (~85) and a chat template (~20): the longest of 4 drawn is about 200.
DEFAULT_PROMPT_TOKENS = 200


def resolve_plan_model(model: str, bits: int | None) -> tuple[ModelShape, str]:
    """(shape, description) of a known shape name (shapes.SHAPES), a local model directory or a cached hub id;
    `bits` quantizes an unquantized model as `--quantize --q-bits` would."""
    from ..model.shapes import SHAPES, shape_config

    if model in SHAPES:
        config = {**shape_config(model), "torch_dtype": "bfloat16"}  # the published models' dtype
    else:
        try:
            config = read_model_config(model)
        except UserError as e:
            raise UserError(f"{e}, or a known shape name ({', '.join(SHAPES)})")
    shape = model_shape(config, bits)
    if bits is not None and shape.bits != bits:
        raise UserError(f"--bits {bits}: model {model!r} is already quantized to {shape.bits} bits; drop --bits")
    precision = f"{shape.bits}-bit" if shape.bits else f"{8 * shape.dtype_bytes}-bit floats"
    return shape, (f"{model}: {shape.num_layers} layers, hidden {shape.hidden_size}, vocabulary {shape.vocab_size}, "
                   f"{precision}; weights {estimate_step(shape, _probe_step())['weights'] / GB:.2f} GB")


def _probe_step() -> StepShape:
    return StepShape(batch_size=1, group_size=2, prompt_tokens=1, max_tokens=1, micro_batch_size=1)


def plan_report(model: str, bits: int | None, config, prompt_tokens: int, estimate=estimate_step) -> str:
    """`grpo-mlx plan`'s text: the settings, the plan chosen (or why none fits), the predicted peak per
    phase, and the fits table. `config`: a TrainConfig holding PLAN_FIELDS."""
    shape, described = resolve_plan_model(model, bits)
    budget, source = memory_budget(config.memory_limit)
    step = train_step_shape(config, prompt_tokens, config.batch_size)
    lines = [f"model {described}",
             f"step: B={step.batch_size} prompts x G={step.group_size} completions, prompts of {prompt_tokens} tokens, "
             f"{step.max_tokens} completion tokens, beta {config.beta}, LoRA rank {step.lora_rank} on "
             f"{'all' if step.lora_layers < 0 else step.lora_layers} layers",
             f"budget: {budget / GB:.2f} GB ({source})"]
    try:
        plan = choose_plan(shape, step, budget, config.micro_batch_size, config.grad_checkpoint, estimate, "--bits 4")
        lines += [f"plan: {plan.describe()}", "predicted peak per phase:", format_phases(plan.phases)]
    except UserError as e:
        least_step, least = smallest_plan(shape, step, config.micro_batch_size, config.grad_checkpoint, estimate)
        lines += [f"plan: none fits: {e}",
                  f"predicted peak per phase at the smallest plan (micro-batch {least_step.micro_batch_size}, "
                  f"checkpointing {'on' if least_step.grad_checkpoint else 'off'}):", format_phases(least)]
    lines += ["", f"What fits on a Mac (largest G x completion tokens over G in {', '.join(map(str, TABLE_GROUP_SIZES))} "
                  f"and T in {', '.join(map(str, TABLE_MAX_TOKENS))}; B prompts per step; the GPU's working set in GB "
                  "in brackets; * with gradient checkpointing; the rest as above):",
              format_fits_table(fits_table(shape, step, estimate=estimate))]
    return "\n".join(lines)
