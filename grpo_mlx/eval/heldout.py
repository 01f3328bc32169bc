"""Evaluation during training (`--eval-every N`): greedy accuracy on a fixed held-out set.

Choices, and why:
1. The held-out set is `--eval-dataset`, else the training data set's own test split (then its
   validation split); a single training file has none, and `--eval-every` then asks for
   `--eval-dataset` rather than evaluating on the training data.
2. It is the first `--eval-limit` problems, as `grpo-mlx eval --limit N` takes them (a built-in
   task's held-out problems are drawn from --seed), so the same problems every time and the
   same numbers `grpo-mlx eval --adapter-path` gives for a checkpoint.
3. The scoring is `evaluate.evaluate_examples`, the code of `grpo-mlx eval`: greedy, the
   training run's system prompt, --max-tokens and prompt-length limit; with --tools or --env the
   trajectories are multi-turn with the run's own environment.
4. Loaded before the model (a bad --eval-dataset fails at start-up); evaluated on rank 0 only.
5. Greedy decoding draws no random numbers, and each training step reseeds MLX, so evaluating
   changes nothing in the training itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.config import TrainConfig, multi_turn, trajectory_tokens, turn_limit
from ..core.errors import UserError
from ..data.examples import Example, load_examples

HELD_OUT_SPLITS = ("test", "validation")


def load_heldout(config: TrainConfig, log=lambda msg: None) -> list[Example] | None:
    """The held-out examples for --eval-every (None when it is off)."""
    if not config.eval_every:
        return None
    dataset = config.eval_dataset or config.dataset
    same_data = dataset == config.dataset
    if config.eval_dataset is not None and Path(dataset).expanduser().is_file():
        splits = ["train"]  # a file named for evaluation is the held-out set, whole
    elif Path(dataset).expanduser().is_file():
        splits = []  # the training file itself: no split of it is held out
    else:
        splits = [s for s in HELD_OUT_SPLITS if not (same_data and s == config.split)]
    problem = "a single file has no held-out split" if not splits else None
    for split in splits:
        try:
            examples = load_examples(dataset, split=split, dataset_config=config.dataset_config if same_data else None,
                                     prompt_field=config.prompt_field, answer_field=config.answer_field,
                                     limit=config.eval_limit, seed=config.seed)
        except UserError as e:
            problem = problem or str(e)  # the first split's problem: the test split is the one expected
            continue
        if any(ex.answer is None for ex in examples):
            raise UserError(f"--eval-every: {dataset} ({split}) has no gold answers to score against: "
                            "name the answer field with --answer-field, or pass another --eval-dataset")
        log(f"evaluating every {config.eval_every} steps on {len(examples)} problems of {dataset} ({split})")
        return examples
    raise UserError(f"--eval-every {config.eval_every} found no held-out set in {dataset} ({problem}): "
                    "pass --eval-dataset with a test file or data set, or drop --eval-every")


def fitting_prompts(run, examples: list[Example]) -> list[Example]:
    """The held-out examples whose prompts fit the run's prompt-length limit (as `grpo-mlx eval` drops them)."""
    from ..data.prompts import drop_long_prompts

    kept, _ = drop_long_prompts(run.tokenizer, examples, run.system_prompt, run.prompt_limit, "the held-out set")
    return kept


def evaluate_run(run, examples: list[Example]) -> dict:
    """The eval/ metrics of the run's current adapters on `examples`: eval/accuracy and a few more."""
    from .evaluate import evaluate_examples

    c = run.config
    turns = None
    if multi_turn(c):
        turns = {"make_env": run.make_env, "max_turns": turn_limit(c), "max_trajectory_tokens": trajectory_tokens(c)}
    # Parents before children (apply_to_modules' order): restoring each in turn gives every module its own mode back.
    modes = [(module, module.training) for _, module in run.model.named_modules()]
    run.model.eval()  # no LoRA dropout in a greedy evaluation
    tic = time.perf_counter()
    try:
        result = evaluate_examples(run.model, run.tokenizer, examples, system_prompt=c.system_prompt,
                                   max_tokens=c.max_tokens, batch_size=c.batch_size * c.group_size, turns=turns)
    finally:
        for module, training in modes:
            module.train(training)
    n = result["num_examples"]
    metrics = {"eval/accuracy": result["accuracy"], "eval/truncated": result["greedy_truncated"] / n,
               "eval/time": time.perf_counter() - tic}
    for key in ("turns/mean", "tools/calls_per_trajectory"):
        if key in result:
            metrics[f"eval/{key}"] = result[key]
    return metrics
