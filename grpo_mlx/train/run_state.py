"""`Run`: everything a training step needs, built once by `trainer.setup` and read by the step
(`trainer.grpo_step`) and by the sampling of its groups (`sampling.sample_groups`).

Its own module so that `sampling` and `trainer` both read it and neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.nn as nn
import mlx.optimizers as optim

from ..core.config import TrainConfig
from ..data.examples import Example
from ..envs.environments import Environment
from ..memory.planner import Plan
from ..model.frozen_prefix import PrefixStates
from ..rollout.batch import Rollout, generate_rollout
from ..rollout.multiturn import generate_multiturn_rollout


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""

    config: TrainConfig
    model: nn.Module
    tokenizer: object  # mlx-lm's TokenizerWrapper
    adapter_config: dict
    examples: list[Example]
    reward_fns: dict[str, Callable]
    reward_weights: dict[str, float]
    optimizer: optim.Optimizer
    system_prompt: str | None
    prompt_limit: int | None = None  # longest prompt in tokens (prompts.prompt_length_limit)
    # The memory plan (planner.plan_training): micro-batch size, checkpointing, logits chunk, predicted peak.
    plan: Plan | None = None
    step: int = 0
    data_position: int = 0
    bad_steps: int = 0
    # Whether the model's body and LM head can run apart (logprobs.lm_head_split_matches):
    # then logits are formed for completion positions only.
    split_head: bool = False
    # Whether a group's prompt can run once for its G rows (logprobs.supports_shared_prompt).
    shared_prompt: bool = False
    # The frozen blocks' output, kept by the reference pass for the policy passes (model/frozen_prefix.py); None: not shared.
    prefix: PrefixStates | None = None
    # generate_rollout's signature; tests inject fixed completions through it
    rollout_fn: Callable[..., Rollout] = generate_rollout
    # Multi-turn (--tools, --env): what makes each trajectory's environment, and the rollout that runs them.
    make_env: Callable[[], Environment] | None = None
    multiturn_fn: Callable[..., Rollout] = generate_multiturn_rollout
    grad_step: Callable | None = None  # make_grad_step's function, built on the first step

    @property
    def logprob_path(self) -> str:
        """The key of LOGPROB_PATHS this run's log-prob passes take."""
        if self.shared_prompt:
            return "shared-prompt"
        return "split-head" if self.split_head else "full-forward"
