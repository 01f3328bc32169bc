"""The reference and policy passes share the frozen blocks in front of the adapters.

LoRA on the last `lora_layers` blocks leaves the blocks before them without adapters and
without trainable parameters: their output is the same with adapters on (the policy) and off
(the reference), and no gradient reaches them. The rollout already ran them: it keeps their
output at every position (rollout/batch.py, `record_blocks`), `states_for_passes` lays it out
per body call, and the reference pass and the policy passes (forward and backward, once per
update of mu) replay it from `PrefixStates`, starting at the first adapted block. Where the
rollout kept nothing (multi-turn, another mlx-lm's generator) the reference pass records it
instead. On SmolLM2-135M with adapters on 16 of 30 blocks that is 14 blocks fewer in every
log-prob pass.

The body is run in two parts by handing mlx-lm's model body a slice of its own `layers`
(and the output of the first part as `input_embeddings`): the model's own code, masks and
caches, no copy of it. `prefix_sharing_matches` checks that on the model before a trainer
relies on it.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .logprobs import group_token_logprobs, lm_head_split, token_logprobs


def frozen_blocks(model) -> int:
    """How many leading transformer blocks hold no adapter and no trainable parameter."""
    count = 0
    for block in getattr(model, "layers", []):
        adapted = any(hasattr(m, "lora_a") for _, m in block.named_modules())
        if adapted or tree_flatten(block.trainable_parameters()):
            break
        count += 1
    return count


class PrefixStates:
    """The frozen blocks' output of each body call of one pass, replayed by the passes after it.

    `record()` starts a pass that runs the frozen blocks and keeps their output, call by call;
    `replay()` starts a pass that takes them back in the same order (the same micro-batches, the
    same calls). The kept outputs are stop-gradient: nothing upstream of them trains.
    """

    def __init__(self, blocks: int):
        self.blocks = blocks
        self.states: list[mx.array] = []
        self.position: int | None = None  # None: recording

    def record(self) -> None:
        """The next pass runs the frozen blocks and keeps their output (the last step's are dropped)."""
        self.clear()

    def replay(self) -> None:
        if not self.states:
            raise RuntimeError("replay() before a recorded pass")
        self.position = 0

    def load(self, states: list[mx.array]) -> None:
        """Replay `states` (kept elsewhere, e.g. by the rollout: `states_for_passes`) from the next pass on."""
        self.states, self.position = list(states), 0

    def clear(self) -> None:
        """Drop the kept outputs, so they are freed before the next rollout; the next pass records."""
        self.states, self.position = [], None

    def wrap(self, body):
        """`body(inputs, cache=None)` run as the frozen blocks (recorded or replayed), then the rest."""
        def call(inputs, cache=None):
            front = cache[: self.blocks] if cache is not None else None
            back = cache[self.blocks :] if cache is not None else None
            if self.position is None:
                with only_blocks(body, slice(None, self.blocks), final_norm=False):
                    hidden = mx.stop_gradient(body(inputs, cache=front))
                self.states.append(hidden)
            else:
                hidden = self.states[self.position]
                self.position += 1
            with only_blocks(body, slice(self.blocks, None)):
                return body(inputs, cache=back, input_embeddings=hidden)

        return call


def states_for_passes(row_states, widths, batches, batch_groups=None) -> list[mx.array]:
    """The frozen blocks' output, per body call of a log-prob pass, from each row's output kept
    while generating (`Rollout.prefix_states`): what recording would keep.

    Calls as logprobs.token_logprobs (split head) and group_token_logprobs make them, micro-batch
    by micro-batch (tokens `widths[k]` wide): [rows, width - 1, d], or a shared-prompt micro-batch's
    [groups, S, d] prompt call and [rows, width - 1 - S, d] completion call. Positions past a row's
    end are zeros: causal attention keeps them out of every scored position.
    """
    def row(i, begin, end):
        prompt, rest = row_states[i]
        states = mx.concatenate([prompt, rest], axis=0)[begin:end]
        missing = end - begin - states.shape[0]
        return mx.pad(states, [(0, missing), (0, 0)]) if missing > 0 else states

    calls = []
    for b, groups, width in zip(batches, batch_groups or [None] * len(batches), widths):
        rows = range(*b.indices(len(row_states)))
        if groups is None:
            calls.append(mx.stack([row(i, 0, width - 1) for i in rows]))
            continue
        shared = min(length for _, _, length in groups) - 1
        if shared > 0:
            calls.append(mx.stack([row(rows[first], 0, shared) for first, _, _ in groups]))
        calls.append(mx.stack([row(i, shared, width - 1) for i in rows]))
    return calls


@contextlib.contextmanager
def only_blocks(body, blocks: slice, final_norm: bool = True):
    """The model body with only `blocks` of its layers (and without its final norm if not `final_norm`)."""
    layers, norm = body.layers, body.norm
    body.layers = layers[blocks]
    if not final_norm:
        body.norm = nn.Identity()
    try:
        yield body
    finally:
        body.layers, body.norm = layers, norm


def prefix_sharing_matches(model, atol: float = 1e-4) -> bool:
    """Whether recording and replaying the frozen blocks reproduces the plain log-probs, on both
    log-prob paths (row by row and shared prompts), for a model with frozen blocks and a split head."""
    blocks = frozen_blocks(model)
    split = lm_head_split(model)
    if blocks == 0 or blocks >= len(model.layers) or split is None:
        return False
    body = split[0]
    if not (hasattr(body, "layers") and hasattr(body, "norm")):
        return False
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 7, 6, 0], [8, 9, 5, 5, 3, 0, 0], [8, 9, 5, 2, 3, 4, 5]])
    prefix = PrefixStates(blocks)
    try:
        for run in (lambda p: token_logprobs(model, tokens, start=2, split_head=True, prefix=p),
                    lambda p: group_token_logprobs(model, tokens, ((0, 2, 4), (2, 4, 3)), prefix=p)):
            expected = run(None)
            prefix.record()
            recorded = run(prefix)
            prefix.replay()
            replayed = run(prefix)
            if not all(bool(mx.allclose(expected, got, atol=atol, rtol=atol).item()) for got in (recorded, replayed)):
                return False
    except Exception:  # a body that takes no input_embeddings, or layers it cannot slice
        return False
    return True
