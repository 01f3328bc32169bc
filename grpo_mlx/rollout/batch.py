"""Rollouts: G sampled completions for each of B prompts, in one batched generation.

Each prompt is prefilled once; its KV cache is handed to mlx-lm's
`BatchGenerator` for all G completions of its group (the generator copies
caches when it merges them into the batch), so the N = B*G completions decode
together and the prompt costs one forward, not G. The prefill runs the model's
body only, without the LM head, where that split is exact (`lm_head_split_matches`):
its logits would be thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import mlx.core as mx
import numpy as np

from ..core.errors import UserError
from ..model.logprobs import lm_head_split, lm_head_split_matches

# The mlx-lm releases whose BatchGenerator API (`insert`, `next_generated`, `close`) this module
# was tested with; pyproject.toml declares the same range and .ci/run tests its floor.
MLX_LM_RANGE = ((0, 31, 3), (0, 33))
MLX_LM_REQUIREMENT = "mlx-lm>=0.31.3,<0.33"


def check_mlx_lm(version: str | None = None) -> None:
    """A one-line error, not a traceback mid-training, when the installed mlx-lm is outside the tested range."""
    from mlx_lm.generate import BatchGenerator

    if version is None:
        try:
            version = metadata.version("mlx-lm")
        except metadata.PackageNotFoundError:  # a source checkout on the path: judge by its API alone
            version = ".".join(map(str, MLX_LM_RANGE[0]))
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())
    low, high = MLX_LM_RANGE
    api = all(hasattr(BatchGenerator, name) for name in ("insert", "next_generated", "close"))
    if not (low <= release < high) or not api:
        raise UserError(
            f"mlx-lm {version} is not supported: grpo-mlx's rollouts need {MLX_LM_REQUIREMENT}; "
            f"install it with: pip install '{MLX_LM_REQUIREMENT}'"
        )


check_mlx_lm()  # on import: `train` stops here, before it loads a model or writes a run directory


@dataclass
class Rollout:
    """B prompts x G completions; prompt i's completions are rows i*G .. i*G+G-1.

    `completion_tokens` include the stop token when the completion stopped
    (the policy must learn to stop); `texts` exclude it.

    A multi-turn rollout (multiturn.py) fills the fields after `sampling_logprobs`:
    its completion is everything after the prompt, the model's turns and the
    observations between them, and `completion_masks` marks the model's own tokens.
    """

    prompt_tokens: list[list[int]]  # per row (shared within a group)
    completion_tokens: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]  # "stop" | "length" (| "turns": out of turns, multi-turn)
    group_size: int
    # The sampler's view: log-softmax of the raw logits at each completion token
    # (before temperature and top-p), from the generator at no extra cost.
    sampling_logprobs: list[list[float]] | None = None
    # Multi-turn, per row: 1 for the model's own tokens, 0 for the observations and template text between turns.
    completion_masks: list[list[int]] | None = None
    turns: list[int] | None = None
    tool_calls: list[int] | None = None
    tool_errors: list[int] | None = None
    tool_seconds: list[float] | None = None
    messages: list[list[dict]] | None = None  # the conversation after the prompt, with roles
    final_turns: list[str] | None = None  # the last model turn's text: what answer-based rewards read
    # The frozen blocks' output at each input position, kept while generating (`record_blocks`), per row:
    # (the prompt's first P-1 positions [P-1, d], one array shared by the group; the rest [1 + L, d]).
    prefix_states: list[tuple[mx.array, mx.array]] | None = None
    tool_time: float = 0.0  # wall seconds the rollout waited for the environments

    # The per-row fields, in the constructor's order after group_size.
    ROW_FIELDS = ("sampling_logprobs", "completion_masks", "turns", "tool_calls", "tool_errors", "tool_seconds",
                  "messages", "final_turns", "prefix_states")

    @property
    def num_rows(self) -> int:
        return len(self.completion_tokens)

    @property
    def completion_lengths(self) -> list[int]:
        return [len(c) for c in self.completion_tokens]

    @property
    def model_token_counts(self) -> list[int]:
        """Tokens the model sampled per row (a multi-turn row's observations left out)."""
        if self.completion_masks is None:
            return self.completion_lengths
        return [sum(m) for m in self.completion_masks]

    @property
    def truncated(self) -> list[bool]:
        return [r != "stop" for r in self.finish_reasons]

    @property
    def multi_turn(self) -> bool:
        return self.turns is not None

    def select_groups(self, groups: list[int]) -> "Rollout":
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        pick = lambda xs: None if xs is None else [xs[r] for r in rows]  # noqa: E731
        return Rollout(
            pick(self.prompt_tokens), pick(self.completion_tokens), pick(self.texts),
            pick(self.finish_reasons), self.group_size,
            **{name: pick(getattr(self, name)) for name in self.ROW_FIELDS}, tool_time=self.tool_time,
        )

    @staticmethod
    def concatenate(rollouts: list["Rollout"]) -> "Rollout":
        first = rollouts[0]
        join = lambda attr: [x for r in rollouts for x in (getattr(r, attr) or [])]  # noqa: E731
        optional = {name: join(name) if all(getattr(r, name) is not None for r in rollouts) else None
                    for name in Rollout.ROW_FIELDS}
        return Rollout(
            join("prompt_tokens"), join("completion_tokens"), join("texts"),
            join("finish_reasons"), first.group_size, **optional, tool_time=sum(r.tool_time for r in rollouts),
        )


def pad_batch(prompt_tokens, completion_tokens, pad_id: int = 0, bucket: int = 1, mask_rows=None, token_masks=None):
    """Right-padded [N, T] tokens and the [N, T-1] mask of completion targets.

    `completion_mask[i, t]` is 1 where tokens[i, t+1] is a completion token,
    the positions `token_logprobs` scores. T is rounded up to a multiple of
    `bucket` so a compiled step sees few distinct shapes. `mask_rows` ([N]
    bool) zeroes whole rows (e.g. truncated completions under DAPO's masking).
    `token_masks` (per row, one 0/1 per completion token; `Rollout.completion_masks`)
    zeroes single targets: a multi-turn row's observation tokens stay in `tokens`
    as context but are never trained on.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompt_tokens, completion_tokens)]
    width = max(lengths)
    width = -(-width // bucket) * bucket
    tokens = np.full((len(lengths), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(lengths), width - 1), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompt_tokens, completion_tokens)):
        tokens[i, : len(p)] = p
        tokens[i, len(p) : len(p) + len(c)] = c
        if mask_rows is None or not mask_rows[i]:
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0 if token_masks is None else token_masks[i]
    return mx.array(tokens), mx.array(mask)


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    return mlx_lm_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k, min_p=min_p)


def generate_rollout(
    model,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    sampler,
    prefill_step_size: int = 2048,
    on_token=None,
    with_logprobs: bool = False,
    record_blocks: int = 0,
) -> Rollout:
    """Sample `group_size` completions for each prompt, all N decoded in one batch.

    `on_token(tokens_done)` is called after each decode step, for progress.
    `with_logprobs=True` keeps `Rollout.sampling_logprobs`; training and eval leave
    it off (the trainer recomputes log-probs): keeping them holds every step's
    [N, V] log-softmax alive until the end and stacks N*T scalars.
    `record_blocks`: keep the output of the first `record_blocks` transformer blocks at
    every position (`Rollout.prefix_states`): the frozen blocks before the first adapter,
    whose output the reference pass would otherwise compute again (model/frozen_prefix.py).
    """
    # Sample the policy itself: LoRA dropout (training mode) acts in the training forward only.
    modes = [(name, m, m.training) for name, m in model.named_modules()]
    model.eval()
    try:
        return _generate_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, prefill_step_size, on_token,
                                 with_logprobs, record_blocks)
    finally:  # each module's own mode back; train() sets a whole subtree, so parents go first
        for _, m, mode in sorted(modes, key=lambda entry: (entry[0] != "", entry[0].count("."))):
            m.train(mode)


def _generate_rollout(model, tokenizer, prompts, group_size, max_tokens, sampler, prefill_step_size, on_token, with_logprobs,
                      record_blocks):
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    n = len(prompts) * group_size
    stop_tokens = [[t] for t in sorted(tokenizer.eos_token_ids)]
    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=stop_tokens,
        sampler=sampler,
        completion_batch_size=n,
        prefill_batch_size=n,
        prefill_step_size=prefill_step_size,
    )
    # The prefill only fills the KV cache: at Qwen2.5's 151,936-token vocabulary the LM head
    # would be about a quarter of its arithmetic and a [P, V] float32 block per prompt.
    prefill = lm_head_split(model)[0] if lm_head_split_matches(model) else model
    caches = [make_prompt_cache(model) for _ in prompts]
    recorder = _BlockRecorder(model, record_blocks)
    prompt_states = []
    with recorder:
        for prompt, cache in zip(prompts, caches):
            if len(prompt) > 1:  # the last prompt token is the generator's first input
                for start in range(0, len(prompt) - 1, prefill_step_size):
                    prefill(mx.array(prompt[start : min(start + prefill_step_size, len(prompt) - 1)])[None], cache=cache)
                mx.eval([c.state for c in cache])
            prompt_states.append(recorder.take())
    row_prompts = [[prompt[-1]] for prompt in prompts for _ in range(group_size)]
    row_caches = [cache for cache in caches for _ in range(group_size)]  # shared: merging the batch copies it

    uids = generator.insert(row_prompts, [max_tokens] * n, caches=row_caches)
    row_of = {uid: i for i, uid in enumerate(uids)}
    completions: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[mx.array]] | None = [[] for _ in range(n)] if with_logprobs else None
    finish = ["length"] * n
    decode_rows = []  # per generator step, the rows of its model call (the rows it answers for, in order)
    done = 0
    try:
        with recorder:
            while responses := generator.next_generated():
                rows = []
                for r in responses:
                    i = row_of[r.uid]
                    rows.append(i)
                    completions[i].append(r.token)
                    if logprobs is not None:
                        logprobs[i].append(r.logprobs[r.token])
                    if r.finish_reason is not None:
                        finish[i] = r.finish_reason
                decode_rows.append(rows)
                done += 1
                if on_token is not None:
                    on_token(done)
    finally:
        generator.close()

    eos = set(tokenizer.eos_token_ids)
    texts = [tokenizer.decode([t for t in c if t not in eos]) for c in completions]
    row_prompt_tokens = [p for p in prompts for _ in range(group_size)]
    prefix_states = None
    if record_blocks:
        prefix_states = _row_states(prompt_states, recorder.take(), decode_rows, group_size)
    if logprobs is None:
        return Rollout(row_prompt_tokens, completions, texts, finish, group_size, prefix_states=prefix_states)
    flat = mx.stack([lp for row in logprobs for lp in row]).tolist() if any(logprobs) else []
    sampling_logprobs, start = [], 0
    for row in completions:
        sampling_logprobs.append(flat[start : start + len(row)])
        start += len(row)
    return Rollout(row_prompt_tokens, completions, texts, finish, group_size, sampling_logprobs,
                   prefix_states=prefix_states)


class _BlockRecorder:
    """Within `with`, keeps the output of transformer block `blocks - 1` of every model call (none when
    `blocks` is 0): the frozen prefix's output, handed to the reference pass instead of computing it again.

    The block is swapped in the body's own `layers` list for a wrapper, as frozen_prefix.only_blocks
    swaps the list: the model's code runs unchanged.
    """

    def __init__(self, model, blocks: int):
        split = lm_head_split(model)
        self.body = split[0] if split is not None and blocks else None
        self.index = blocks - 1
        self.outputs: list[mx.array] = []

    def __enter__(self):
        if self.body is not None:
            self.layers = self.body.layers
            self.body.layers = [*self.layers[: self.index], _Recording(self.layers[self.index], self.outputs),
                                *self.layers[self.index + 1 :]]
        return self

    def __exit__(self, *exc):
        if self.body is not None:
            self.body.layers = self.layers

    def take(self) -> list[mx.array]:
        """The outputs kept since the last take()."""
        outputs, self.outputs[:] = list(self.outputs), []
        return outputs


class _Recording:
    def __init__(self, block, outputs):
        self.block, self.outputs = block, outputs

    def __call__(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.outputs.append(out)
        return out

    def __getattr__(self, name):  # what the model reads of its blocks (e.g. use_sliding) reads the block
        return getattr(self.block, name)


def _row_states(prompt_states, decode_states, decode_rows, group_size):
    """Per row: (the prompt's recorded positions, shared by its group; the decode steps' positions).

    The generator's first model call runs every row's last prompt token, in the order of its first
    answers; each later call runs the rows it answers for, with the tokens it answers with. None where
    the calls are not laid out so (another mlx-lm's generator): the reference pass then runs the blocks.
    """
    n = len(prompt_states) * group_size
    if len(decode_states) != len(decode_rows) + 1 or not decode_rows or sorted(decode_rows[0]) != list(range(n)):
        return None
    first_call = [decode_rows[0]] + decode_rows
    if any(not isinstance(out, mx.array) or out.ndim != 3 or out.shape[:2] != (len(rows), 1)
           for out, rows in zip(decode_states, first_call)):
        return None
    if any(not isinstance(out, mx.array) or out.ndim != 3 or out.shape[0] != 1 for outs in prompt_states for out in outs):
        return None
    flat = mx.concatenate([out[:, 0] for out in decode_states], axis=0)
    positions = [[] for _ in range(n)]
    offset = 0
    for rows in first_call:
        for k, i in enumerate(rows):
            positions[i].append(offset + k)
        offset += len(rows)
    width = flat.shape[-1]
    prompts = [mx.concatenate([out[0] for out in outs], axis=0) if outs else mx.zeros((0, width), flat.dtype)
               for outs in prompt_states]
    return [(prompts[i // group_size], flat[mx.array(positions[i])]) for i in range(n)]
