"""The GRPO training loop: rollout -> rewards -> advantages -> updates -> checkpoint.

Choices, and why:
1. One rollout per step: B prompts x G completions, decoded in one batch.
2. Advantages are group-relative (DeepSeekMath outcome supervision), one per
   completion, broadcast over its tokens.
3. mu = num_iterations updates per rollout. With mu = 1 the old policy is the
   current one, so old log-probs are the stop-gradient of the current ones and
   cost no extra forward; with mu > 1 they are computed once, before the first
   update, and stored.
4. The reference policy is the same model with adapters bypassed; beta = 0
   skips the reference forward entirely.
5. Micro-batches accumulate gradients; each loss is normalised by the global
   batch's counts (policy_loss's num_sequences / num_tokens), so accumulating
   gives the full batch's gradient for every loss_type.
6. A non-finite loss or gradient skips the update; several in a row stop the run.

`train` is a generator of (metrics, sample) pairs and prints nothing;
`run_training` wires it to the run directory, checkpoints and the dashboard.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .config import TrainConfig, config_to_dict
from .errors import UserError
from .grpo import group_advantages, policy_loss_terms, token_logprobs
from .policy import attach_adapters, load_model, reference_mode
from .rollout import Rollout, generate_rollout, make_sampler, pad_batch

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops
LENGTH_BUCKET = 32  # pad batches to multiples of this: few distinct shapes


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""

    config: TrainConfig
    model: nn.Module
    tokenizer: object
    adapter_config: dict
    examples: list
    reward_fns: dict
    reward_weights: dict
    optimizer: optim.Optimizer
    system_prompt: str | None
    step: int = 0
    data_position: int = 0
    bad_steps: int = 0


# ---------------------------------------------------------------- setup


def setup(config: TrainConfig, log=lambda msg: None) -> Run:
    from .data import load_examples, resolve_system_prompt
    from .rewards import get_reward

    reward_fns = {name: get_reward(name) for name in config.reward}
    weights = config.reward_weights or [1.0] * len(config.reward)
    log(f"loading data set {config.dataset} ({config.split})")
    examples = load_examples(
        config.dataset,
        split=config.split,
        dataset_config=config.dataset_config,
        prompt_field=config.prompt_field,
        answer_field=config.answer_field,
        seed=config.seed,
    )
    log(f"loading model {config.model or 'embedded demo'}" + (" and quantizing" if config.quantize else ""))
    model, tokenizer, _ = load_model(config.model, config.quantize, config.q_bits, config.q_group_size)
    mx.random.seed(config.seed)  # LoRA A matrices start from this seed
    adapter_config = attach_adapters(
        model, config.lora_rank, config.lora_layers, config.lora_scale, config.lora_dropout, config.dora
    )
    adapter_config["model"] = config.model or "embedded-demo"
    if config.quantize:  # fuse and generate must rebuild the same quantized base
        adapter_config["quantized_on_load"] = {"bits": config.q_bits, "group_size": config.q_group_size}
    if config.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    mx.eval(model.parameters())
    return Run(
        config=config,
        model=model,
        tokenizer=tokenizer,
        adapter_config=adapter_config,
        examples=examples,
        reward_fns=reward_fns,
        reward_weights=dict(zip(config.reward, weights)),
        optimizer=make_optimizer(config),
        system_prompt=resolve_system_prompt(config.system_prompt),
    )


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    lr = config.learning_rate
    if config.warmup_steps > 0:
        warmup = optim.linear_schedule(0.0, lr, config.warmup_steps)
        lr = optim.join_schedules([warmup, lambda _: mx.array(config.learning_rate)], [config.warmup_steps])
    return optim.AdamW(learning_rate=lr, weight_decay=config.weight_decay)


# ---------------------------------------------------------------- rollout and rewards


def sample_groups(run: Run, step: int):
    """Draw prompts, roll out G completions each, score them.

    With dynamic sampling (DAPO) groups whose rewards are all equal are dropped
    and more prompts are drawn, up to `max_sampling_rounds` extra rounds.
    """
    from .data import render_prompt, take_examples
    from .rewards import score_completions

    c = run.config
    G = c.group_size
    sampler = make_sampler(c.temperature, c.top_p, c.top_k, c.min_p)
    kept_rollouts, kept_examples, kept_rewards, kept_valid, kept_columns = [], [], [], [], []
    gen_time = reward_time = 0.0
    gen_tokens = 0
    for round_ in range(1 + (c.max_sampling_rounds if c.dynamic_sampling else 0)):
        need = c.batch_size - len(kept_examples)
        examples = take_examples(run.examples, c.seed, run.data_position, need)
        run.data_position += need
        prompts = [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]

        tic = time.perf_counter()
        rollout = generate_rollout(run.model, run.tokenizer, prompts, G, c.max_tokens, sampler)
        gen_time += time.perf_counter() - tic
        gen_tokens += sum(rollout.completion_lengths)

        tic = time.perf_counter()
        rewards, valid, columns = score_completions(
            run.reward_fns,
            run.reward_weights,
            rollout.texts,
            [ex.answer for ex in examples for _ in range(G)],
            [ex.meta for ex in examples for _ in range(G)],
            completion_lengths=rollout.completion_lengths,
            group_size=G,
            max_completion_length=c.max_tokens,
        )
        reward_time += time.perf_counter() - tic

        grouped = np.array(rewards, dtype=np.float64).reshape(-1, G)
        informative = [g for g in range(len(examples)) if not c.dynamic_sampling or np.ptp(grouped[g]) > 0]
        for g in informative:
            rows = slice(g * G, (g + 1) * G)
            kept_examples.append(examples[g])
            kept_rewards += rewards[rows]
            kept_valid += valid[rows]
            kept_columns.append({k: v[rows] for k, v in columns.items()})
        kept_rollouts.append(rollout.select_groups(informative))
        if len(kept_examples) >= c.batch_size:
            break

    rollout = Rollout.concatenate(kept_rollouts)
    columns = {k: [x for col in kept_columns for x in col[k]] for k in columns}
    timing = {"time/generation": gen_time, "time/rewards": reward_time, "generated_tokens": gen_tokens, "sampling_rounds": round_ + 1}
    return rollout, kept_examples, kept_rewards, kept_valid, columns, timing


# ---------------------------------------------------------------- loss


def make_loss_fn(config: TrainConfig):
    def loss_fn(model, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, num_sequences, num_tokens, scale):
        logprobs, entropy = token_logprobs(model, tokens, config.temperature, with_entropy=True)
        if old_logprobs is None:  # mu = 1: the sampling policy is the current one
            old_logprobs = mx.stop_gradient(logprobs)
        loss, metrics = policy_loss_terms(
            logprobs,
            old_logprobs,
            ref_logprobs,
            advantages,
            completion_mask,
            epsilon_low=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
            loss_type=config.loss_type,
            importance_level=config.importance_level,
            max_completion_length=config.max_tokens,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
        )
        mask = completion_mask.astype(mx.float32)
        metrics["entropy"] = (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)
        return loss * scale, metrics

    return loss_fn


def micro_batches(n: int, size: int | None, group_size: int) -> list[slice]:
    size = n if size is None else max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def forward_logprobs(model, tokens, temperature, batches) -> mx.array:
    """Log-probs without gradient, one micro-batch at a time (old or reference policy)."""
    parts = []
    for b in batches:
        lp = mx.stop_gradient(token_logprobs(model, tokens[b], temperature))
        mx.eval(lp)
        parts.append(lp)
    return mx.concatenate(parts, axis=0)


# ---------------------------------------------------------------- one step


def grpo_step(run: Run, step: int):
    """One GRPO step; returns (metrics, sample)."""
    c = run.config
    step_start = time.perf_counter()
    mx.random.seed(c.seed * 1_000_003 + step)  # sampling depends on (seed, step) only: exact resume
    mx.reset_peak_memory()

    rollout, examples, rewards, valid, columns, timing = sample_groups(run, step)
    G = c.group_size
    n = rollout.num_rows
    metrics = reward_metrics(rewards, valid, columns, G)
    metrics.update(completion_metrics(rollout))
    metrics["time/generation"] = timing["time/generation"]
    metrics["time/rewards"] = timing["time/rewards"]
    metrics["tokens_per_sec/generation"] = timing["generated_tokens"] / max(timing["time/generation"], 1e-9)
    if c.dynamic_sampling:
        metrics["sampling_rounds"] = timing["sampling_rounds"]
        metrics["num_groups"] = len(examples)
    sample = make_sample(step, rollout, examples, rewards) if examples else None

    if n == 0:  # dynamic sampling found no informative group
        metrics.update(step=step, skipped_update=1.0, step_time=time.perf_counter() - step_start)
        return metrics, sample

    advantages = group_advantages(mx.array(rewards), G, scale=c.scale_rewards, valid=mx.array(valid))
    mask_rows = rollout.truncated if c.mask_truncated_completions else None
    tokens, completion_mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, LENGTH_BUCKET, mask_rows)
    batches = micro_batches(n, c.micro_batch_size, G)
    num_tokens = float(completion_mask.sum().item())
    scale = 1.0 / len(batches) if c.loss_type == "bnpo" else 1.0  # bnpo normalises per micro-batch

    tic = time.perf_counter()
    old_logprobs = forward_logprobs(run.model, tokens, c.temperature, batches) if c.num_iterations > 1 else None
    ref_logprobs = None
    if c.beta != 0.0:
        with reference_mode(run.model):
            ref_logprobs = forward_logprobs(run.model, tokens, c.temperature, batches)
    metrics["time/logprobs"] = time.perf_counter() - tic

    tic = time.perf_counter()
    loss_and_grad = nn.value_and_grad(run.model, make_loss_fn(c))
    update_metrics = []
    for _ in range(c.num_iterations):
        grads, losses, parts = None, [], []
        for b in batches:
            (loss, m), g = loss_and_grad(
                run.model,
                tokens[b],
                completion_mask[b],
                advantages[b],
                None if old_logprobs is None else old_logprobs[b],
                None if ref_logprobs is None else ref_logprobs[b],
                n,
                num_tokens,
                scale,
            )
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, loss, m)
            losses.append(loss.item())
            parts.append((float(completion_mask[b].sum().item()), {k: v.item() for k, v in m.items()}))
        update_metrics.append(apply_update(run, grads, sum(losses), parts))
    metrics["time/train"] = time.perf_counter() - tic
    # Report the first update's view (ratios of 1 for mu = 1) and the last one's ratios.
    metrics.update(update_metrics[0])
    if len(update_metrics) > 1:
        last = update_metrics[-1]
        for k in ("ratio/mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"):
            metrics[k] = last[k]
    trained_tokens = float(tokens.size) * c.num_iterations
    metrics["tokens_per_sec/train"] = trained_tokens / max(metrics["time/train"], 1e-9)
    metrics["learning_rate"] = float(np.array(run.optimizer.learning_rate))
    metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    metrics["step"] = step
    metrics["step_time"] = time.perf_counter() - step_start
    return metrics, sample


def apply_update(run: Run, grads, loss: float, parts) -> dict:
    """Clip, check for non-finite values, step the optimizer; returns update metrics."""
    c = run.config
    if c.max_grad_norm > 0:
        grads, grad_norm = optim.clip_grad_norm(grads, c.max_grad_norm)
    else:
        grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    grad_norm = float(grad_norm.item())
    total = max(sum(w for w, _ in parts), 1.0)
    metrics = {k: sum(w * m[k] for w, m in parts) / total for k in parts[0][1]}
    metrics.update(loss=loss, grad_norm=grad_norm, skipped_update=0.0)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        run.bad_steps += 1
        metrics["skipped_update"] = 1.0
        if run.bad_steps >= MAX_BAD_STEPS:
            raise NonFiniteError(
                f"training stopped: {run.bad_steps} steps in a row had a non-finite loss or gradient; "
                "lower --learning-rate or check the rewards (the last good adapters are saved)"
            )
        return metrics
    run.bad_steps = 0
    run.optimizer.update(run.model, grads)
    mx.eval(run.model.parameters(), run.optimizer.state)
    return metrics


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


# ---------------------------------------------------------------- metrics


def reward_metrics(rewards, valid, columns, group_size) -> dict:
    r = np.array(rewards, dtype=np.float64)
    if r.size == 0:
        return {"reward": float("nan"), "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    groups = r.reshape(-1, group_size)
    metrics = {
        "reward": float(r.mean()),
        "reward_std": float(groups.std(axis=1, ddof=1).mean()),
        "frac_reward_zero_std": float((np.ptp(groups, axis=1) == 0).mean()),
    }
    for name, column in columns.items():
        values = [v for v in column if v is not None]
        if values:
            metrics[f"rewards/{name}/mean"] = float(np.mean(values))
            metrics[f"rewards/{name}/std"] = float(np.std(values))
    return metrics


def completion_metrics(rollout: Rollout) -> dict:
    lengths = np.array(rollout.completion_lengths or [0])
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/min_length": float(lengths.min()),
        "completions/clipped_ratio": float(np.mean(rollout.truncated)) if rollout.num_rows else 0.0,
    }


def prompt_text(example) -> str:
    if isinstance(example.prompt, str):
        return example.prompt
    return next((m["content"] for m in reversed(example.prompt) if m.get("role") == "user"), str(example.prompt))


def make_sample(step, rollout: Rollout, examples, rewards) -> dict:
    G = rollout.group_size
    return {
        "step": step,
        "prompt": prompt_text(examples[0]),
        "answer": examples[0].answer,
        "completions": rollout.texts[:G],
        "rewards": [float(r) for r in rewards[:G]],
    }


# ---------------------------------------------------------------- the loop


def train(run: Run, stop_requested=lambda: False):
    """Yield (metrics, sample) for each step from run.step + 1 to config.steps."""
    while run.step < run.config.steps and not stop_requested():
        step = run.step + 1
        metrics, sample = grpo_step(run, step)
        run.step = step
        yield metrics, sample


def trainer_state(run: Run) -> dict:
    return {"step": run.step, "data_position": run.data_position, "seed": run.config.seed}


def save(run: Run, run_dir: Path) -> None:
    from .checkpoint import save_checkpoint

    save_checkpoint(run_dir, run.model, run.optimizer, run.adapter_config, trainer_state(run), run.config.keep_checkpoints)


def prepare_run_dir(config: TrainConfig) -> Path:
    """Create the run directory; refuse to mix runs unless --resume or --overwrite."""
    run_dir = Path(config.output)
    has_run = run_dir.is_dir() and any((run_dir / f).exists() for f in ("config.yaml", "metrics.jsonl", "checkpoints"))
    if has_run and not (config.resume or config.overwrite):
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output")
    if config.resume and not has_run:
        raise UserError(f"nothing to resume in {run_dir}: it holds no run; drop --resume to start one")
    if has_run and config.overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume(run: Run, run_dir: Path, log=lambda msg: None) -> None:
    from .checkpoint import load_latest_checkpoint

    found = load_latest_checkpoint(run_dir)
    if found is None:
        log(f"no checkpoint in {run_dir}: starting from step 0")
        return
    weights, optimizer_state, state, path = found
    run.model.load_weights(list(weights.items()), strict=False)
    run.optimizer.state = optimizer_state
    run.step, run.data_position = state["step"], state["data_position"]
    mx.eval(run.model.parameters())
    log(f"resumed from {path.name}")


def write_config(config: TrainConfig, run_dir: Path) -> None:
    import yaml

    from .checkpoint import atomic_write

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda p: Path(p).write_text(text))


def run_training(config: TrainConfig, console=None) -> Path:
    """The `grpo-mlx train` command: set up, train with a dashboard, checkpoint, save."""
    from .dashboard import Dashboard, MetricsLogger, read_metrics
    from .rewards import RewardError

    run_dir = prepare_run_dir(config)
    dashboard = Dashboard(config.steps, console=console, log_every=config.log_every)
    with dashboard:
        run = setup(config, log=dashboard.message)
        if config.resume:
            resume(run, run_dir, log=dashboard.message)
            keep_metrics_until(run_dir / "metrics.jsonl", run.step, read_metrics)
        write_config(config, run_dir)
        logger = MetricsLogger(run_dir)
        stop = install_signal_handlers(dashboard.message)
        try:
            for metrics, sample in train(run, stop_requested=stop.is_set):
                logger.log(metrics)
                dashboard.update(metrics)
                if sample is not None and (run.step % config.sample_every == 0 or run.step == 1):
                    logger.log_sample(sample)
                    dashboard.show_sample(sample)
                if run.step % config.save_every == 0 or run.step == config.steps:
                    save(run, run_dir)
            if stop.is_set() and run.step < config.steps:
                save(run, run_dir)
                dashboard.message(f"interrupted: saved step {run.step}; continue with --resume")
        except (RewardError, NonFiniteError) as e:
            # The failing step made no update: the weights are the last good ones.
            save(run, run_dir)
            raise UserError(f"{e} (saved step {run.step} to {run_dir}; continue with --resume)") from e
        finally:
            stop.restore()
            logger.close()
        dashboard.message(f"adapters saved to {run_dir}")
    return run_dir


def keep_metrics_until(path: Path, step: int, read_metrics) -> None:
    """On resume, drop metric lines of steps after the checkpoint: they will be redone."""
    if not path.exists():
        return
    import json

    from .checkpoint import atomic_write

    kept = [m for m in read_metrics(path) if m.get("step", 0) <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(m) + "\n" for m in kept)))


class _StopFlag:
    def __init__(self):
        self._set = False
        self._previous = {}

    def is_set(self):
        return self._set

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def install_signal_handlers(log) -> _StopFlag:
    """First SIGINT/SIGTERM: finish the current step, save, stop. Second: exit at once."""
    flag = _StopFlag()

    def handler(signum, frame):
        if flag._set:
            raise KeyboardInterrupt
        flag._set = True
        log("stopping after this step (press Ctrl-C again to quit at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            flag._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread (e.g. some test runners)
            pass
    return flag
