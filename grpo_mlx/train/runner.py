"""The `grpo-mlx train` command around the step loop: the run directory, resume,
checkpoints, the dashboard and metrics log, and stopping on a signal.

`trainer.train` yields one (metrics, sample) per step and prints nothing;
`run_training` writes and shows what it yields. With several ranks, rank 0 alone
writes and draws; the others train in step and stop with it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from rich.console import Console

from ..core.config import ONE_SHOT_ACTIONS, TrainConfig, config_to_dict
from ..core.errors import Interrupted, UserError
from ..eval.heldout import evaluate_run, fitting_prompts, load_heldout
from ..rewards.registry import RewardError
from ..ui.dashboard import Dashboard
from ..ui.run_log import MetricsLogger, keep_metrics_until
from ..ui.trackers import Trackers, check_trackers
from . import distributed
from .checkpoint import load_latest_checkpoint, read_best, save_best, save_checkpoint
from .run_dir import clear_old_run, prepare_run_dir, write_config
from .trainer import NonFiniteError, Run, setup, train


def run_training(config: TrainConfig, console=None) -> Path:
    """The `grpo-mlx train` command: set up, train with a dashboard, checkpoint, save."""
    check_trackers(config.report_to)  # a missing tracker package stops the run before anything is made or loaded
    # With several ranks, rank 0 alone writes the run directory and draws the dashboard.
    main = distributed.is_main()
    run_dir, lock = prepare_run_dir(config) if main else (Path(config.output), None)
    try:
        return _train_in(config, run_dir, console)
    finally:
        if lock is not None:
            lock.release()


def _train_in(config: TrainConfig, run_dir: Path, console) -> Path:
    """run_training's body, with the run directory prepared and locked."""
    main = distributed.is_main()
    if main:
        dashboard = Dashboard(config.steps, console=console, log_every=config.log_every, num_iterations=config.num_iterations)
    else:
        dashboard = Dashboard(config.steps, console=Console(quiet=True), plain=True)
    with dashboard:
        heldout = load_heldout(config, log=dashboard.message)  # a bad --eval-dataset fails before the model loads
        run = setup(config, log=dashboard.message)
        if config.overwrite and main:  # data, rewards and model loaded: only now does the old run go
            clear_old_run(run_dir, log=dashboard.message)
        if config.resume:
            resume(run, run_dir, log=dashboard.message)
            if run.step >= config.steps:  # nothing to train: say so rather than "saved" with no step run
                raise UserError(f"the run in {run_dir} is already at step {run.step}, and --steps is {config.steps}: "
                                "pass a larger --steps to train further")
            if main:
                keep_metrics_until(run_dir, run.step)
        if main:
            write_config(config, run_dir, run.logprob_path, run.plan.describe() if run.plan else None)
        logger = MetricsLogger(run_dir) if main else _NoLogger()
        # Rank 0 alone evaluates and reports; the others wait for it in the next step's collectives.
        heldout = fitting_prompts(run, heldout) if main and heldout else None
        best_score = (read_best(run_dir) or {}).get("eval/accuracy") if heldout and config.resume else None
        trackers = Trackers(config.report_to if main else None, run_dir,
                            {k: v for k, v in config_to_dict(config).items() if k not in ONE_SHOT_ACTIONS})
        stop = install_signal_handlers(dashboard.message, several_ranks=distributed.world().size() > 1)
        outcome = "crashed"  # how the trackers' run ends: crashed, aborted (interrupted, resumable) or success
        try:
            # A signal may reach one rank only: all stop after the same step.
            for metrics, sample in train(run, stop_requested=lambda: distributed.any_rank(stop.is_set())):
                if heldout and (run.step % config.eval_every == 0 or run.step == config.steps):
                    metrics.update(evaluate_run(run, heldout))
                logger.log(metrics)
                trackers.log(metrics)
                dashboard.update(metrics)
                if sample is not None and (run.step % config.sample_every == 0 or run.step == 1):
                    logger.log_sample(sample)
                    trackers.log_sample(sample)
                    dashboard.show_sample(sample)
                if run.step % config.save_every == 0 or run.step == config.steps:
                    save(run, run_dir)
                if "eval/accuracy" in metrics and (best_score is None or metrics["eval/accuracy"] > best_score):
                    best_score = metrics["eval/accuracy"]
                    record = {"step": run.step, **{k: v for k, v in metrics.items() if k.startswith("eval/")}}
                    save_best(run_dir, run.model, run.adapter_config, record)
                    dashboard.message(f"step {run.step}: best eval/accuracy so far, {best_score:.2%}; adapters saved to {run_dir / 'best'}")
            if run.step < config.steps:  # the loop ended early: some rank was asked to stop
                save(run, run_dir)
                distributed.barrier()  # no rank exits before rank 0 saved (mlx.launch then stops the rest)
                outcome = "aborted"
                raise Interrupted(f"interrupted: saved step {run.step} to {run_dir}; continue with --resume", stop.signum or signal.SIGINT)
            outcome = "success"
        except (RewardError, NonFiniteError) as e:
            # Every rank is here: these errors are agreed on across ranks. The failing step
            # made no update: the weights are the last good ones.
            if run.step > 0:
                save(run, run_dir)
            distributed.barrier()  # no rank exits before rank 0 saved (mlx.launch then stops the rest)
            if run.step == 0:
                raise UserError(f"{e} (no step completed, nothing saved)") from e
            raise UserError(f"{e} (saved step {run.step} to {run_dir}; continue with --resume)") from e
        finally:
            stop.restore()
            logger.close()
            trackers.close(outcome)
        dashboard.message(f"adapters saved to {run_dir}")
    return run_dir


def checkpoint_mismatch(run: Run, saved_config: dict, weights: dict) -> str | None:
    """How a checkpoint's adapters differ from this run's (None: they fit).

    Compares the checkpoint's own adapter_config.json, then every saved tensor
    against the model's trainable parameters: same names, same shapes.
    """
    ours = run.adapter_config
    changed = []
    for key, flag in (("fine_tune_type", "--dora"), ("num_layers", "--lora-layers"), ("model", "--model"), ("quantized_on_load", "--quantize")):
        if saved_config.get(key) != ours.get(key):
            changed.append(f"{flag}: {saved_config.get(key)!r} -> {ours.get(key)!r}")
    for key, flag in (("rank", "--lora-rank"), ("scale", "--lora-scale")):
        saved, new = saved_config.get("lora_parameters", {}).get(key), ours["lora_parameters"][key]
        if saved != new:
            changed.append(f"{flag}: {saved!r} -> {new!r}")
    if changed:
        return ", ".join(changed)
    expected = dict(tree_flatten(run.model.trainable_parameters()))
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        def first(keys):
            return f" ({keys[0]}{', ...' if len(keys) > 1 else ''})" if keys else ""

        return f"{len(missing)} adapter tensors missing{first(missing)}, {len(unexpected)} unexpected{first(unexpected)}"
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            return f"tensor {key} has shape {tuple(weights[key].shape)}, this run's is {tuple(value.shape)}"
    return None


def resume(run: Run, run_dir: Path, log=lambda msg: None) -> None:
    """Load the newest checkpoint; with several ranks rank 0 reads it and hands it to the others.

    No readable checkpoint, or one whose adapters do not fit this run's, is an
    error: --resume never starts over.
    """
    problem = None
    if distributed.is_main():
        found = load_latest_checkpoint(run_dir, warn=log)
        if found is None:
            problem = (
                f"no readable checkpoint in {run_dir}: --resume will not start over; "
                "restore its checkpoints/ folder, or pass --overwrite to start over"
            )
        else:
            weights, optimizer_state, state, saved_config, path = found
            mismatch = checkpoint_mismatch(run, saved_config, weights)
            if mismatch:
                problem = (
                    f"checkpoint {path.name} in {run_dir} does not fit this run's adapters ({mismatch}): "
                    "resume with the run's own settings, pass --overwrite to replace it, or choose another --output"
                )
            else:
                run.model.load_weights(list(weights.items()), strict=False)  # every key and shape checked above
                run.optimizer.state = optimizer_state
                run.step, run.data_position = state["step"], state["data_position"]
    if distributed.world().size() > 1:
        if distributed.any_rank(problem is not None):  # every rank stops, none waits in a collective
            raise UserError(problem or "rank 0 could not resume the run; see its error")
        share_main_state(run)
    elif problem:
        raise UserError(problem)
    mx.eval(run.model.parameters())
    log(f"resumed from step-{run.step:06d}")


def share_main_state(run: Run) -> None:
    """Rank 0's adapters, optimizer state, step and data position, on every rank.

    The other ranks may be other machines, without the run directory.
    """
    run.optimizer.init(run.model.trainable_parameters())  # the same state tree on every rank
    run.optimizer.state = distributed.broadcast_from_main(run.optimizer.state)
    run.model.update(distributed.broadcast_from_main(run.model.trainable_parameters()))
    counters = [run.step, run.data_position] if distributed.is_main() else [0, 0]
    run.step, run.data_position = (int(x) for x in distributed.sum_across(counters))


def trainer_state(run: Run) -> dict:
    return {"step": run.step, "data_position": run.data_position, "seed": run.config.seed}


def save(run: Run, run_dir: Path) -> None:
    """Checkpoint the run; rank 0 alone writes (the ranks hold the same adapters)."""
    if not distributed.is_main():
        return
    save_checkpoint(run_dir, run.model, run.optimizer, run.adapter_config, trainer_state(run), run.config.keep_checkpoints)


class _NoLogger:
    """Ranks other than 0 write no metrics."""

    def log(self, metrics):
        pass

    def log_sample(self, sample):
        pass

    def close(self):
        pass


class _StopFlag:
    def __init__(self):
        self._set = False
        self.signum = None  # the first signal received
        self._previous = {}

    def is_set(self):
        return self._set

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def install_signal_handlers(log, several_ranks: bool = False) -> _StopFlag:
    """First SIGINT/SIGTERM: finish the current step, save, stop. Second: exit at once.

    With several ranks SIGTERM keeps its default action, ending the process at once:
    mlx.launch sends it to the other ranks when one fails, and a rank blocked in a
    collective (waiting on the failed one) would never run a Python handler.
    """
    flag = _StopFlag()

    def handler(signum, frame):
        if flag._set:
            raise KeyboardInterrupt
        flag._set, flag.signum = True, signum
        log("stopping after this step (press Ctrl-C again to quit at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        action = signal.SIG_DFL if several_ranks and sig == signal.SIGTERM else handler
        try:
            flag._previous[sig] = signal.signal(sig, action)
        except ValueError:  # not in the main thread (e.g. some test runners)
            pass
    return flag
