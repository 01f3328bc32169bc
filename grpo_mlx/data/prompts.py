"""Prompts as the model sees them: system prompts, the chat template, and bounds on prompt length.

Rendering turns an `Example` into the token ids the model continues from; the length
checks keep a prompt longer than the model's context (or `--max-prompt-length`) from
ever reaching the rollout, where it would be allocated unchecked.
"""

from __future__ import annotations

from ..core.errors import UserError
from .examples import Example


# ---------------------------------------------------------------- prompts

SYSTEM_PROMPTS = {
    # DeepSeek-R1-Zero's template, as open-r1 words it for the system role.
    "r1": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>."
    ),
}


def resolve_system_prompt(value: str | None) -> str | None:
    """None, "" or "none" -> no system prompt; a name in SYSTEM_PROMPTS -> its text; else the text itself."""
    if value is None or not value.strip() or value.strip().lower() == "none":
        return None
    return SYSTEM_PROMPTS.get(value, value)


def render_prompt(tokenizer, example: Example, system_prompt: str | None = None) -> list[int]:
    """The token ids the model continues from: the chat template with a generation prompt if
    the tokenizer has one, else "Question: ...\\nAnswer:" for base models."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if isinstance(example.prompt, str):
        messages.append({"role": "user", "content": example.prompt})
    else:
        messages.extend(example.prompt)
    if getattr(tokenizer, "chat_template", None):
        return _apply_chat_template(tokenizer, messages)
    return list(tokenizer.encode(_plain_prompt(messages)))


def _apply_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """`messages` through the chat template with a generation prompt; `tools`: JSON schemas the template renders."""
    from jinja2 import TemplateError

    kwargs = {"tools": tools} if tools else {}
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except TemplateError:
        # Some templates (older Gemma) refuse a system role: fold it into the first user turn.
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        merged = {**first, "content": f"{system['content']}\n\n{first['content']}"}
        ids = tokenizer.apply_chat_template([merged, *rest], add_generation_prompt=True, **kwargs)
    # transformers 5 returns a BatchEncoding where mlx-lm's wrapper returns a list.
    if not isinstance(ids, list) and "input_ids" in ids:
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _plain_prompt(messages: list[dict]) -> str:
    """Messages as plain text for a tokenizer without a chat template."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    question = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    return (f"{system}\n\n" if system else "") + f"Question: {question}\nAnswer:"


# ---------------------------------------------------------------- bounds on prompt length

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def context_length(model_config: dict) -> int | None:
    """The model's context in tokens from its config.json (a VLM's from its text_config); None if it names none."""
    for config in (model_config, model_config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def prompt_length_limit(max_prompt_length: int | None, context: int | None, max_tokens: int) -> int | None:
    """The longest prompt, in tokens, to roll out: --max-prompt-length, and room for max_tokens in the context.

    None when neither is known (no limit).
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"--max-prompt-length {max_prompt_length}: must be at least 1, or leave it unset "
                        "for the model's context length")
    limits = [] if max_prompt_length is None else [max_prompt_length]
    if context is not None:
        if context - max_tokens < 1:
            raise UserError(f"--max-tokens {max_tokens} leaves no room for a prompt in the model's context of "
                            f"{context} tokens: lower --max-tokens")
        limits.append(context - max_tokens)
    return min(limits) if limits else None


def max_chars_per_token(tokenizer) -> int | None:
    """The most characters one token decodes to, bounded by its longest vocabulary entry; None if unknown."""
    try:
        return max(len(piece) for piece in tokenizer.get_vocab())
    except Exception:  # a tokenizer without get_vocab: prompts are then always tokenized
        return None


def drop_long_prompts(tokenizer, examples: list[Example], system_prompt: str | None,
                      limit: int | None, what: str) -> tuple[list[Example], int]:
    """(examples whose rendered prompt fits in `limit` tokens, number dropped); refuses when none fits.

    Cheap where it can be, exact where it matters, and nothing is allocated from an
    unchecked length: a prompt with more characters than `limit` times the most
    characters a token covers is too long without tokenizing it (one 2 MB line); one
    with at most half the limit in UTF-8 bytes fits (a token covers at least one
    byte; the other half is room for the chat template), and the trainer checks the
    rendered ids again before rolling out (`check_prompt_lengths`); the rest are
    rendered and counted exactly.
    """
    if limit is None:
        return examples, 0
    from transformers.utils import logging as transformers_logging

    per_token = max_chars_per_token(tokenizer)
    kept = []
    verbosity = transformers_logging.get_verbosity()
    # Measuring a prompt longer than the model's context is expected here: no "indexing errors" warning.
    transformers_logging.set_verbosity_error()
    try:
        for ex in examples:
            texts = [system_prompt or ""] + ([ex.prompt] if isinstance(ex.prompt, str) else [m["content"] for m in ex.prompt])
            chars = sum(len(t) for t in texts)
            if per_token is not None and chars > limit * per_token:
                continue
            if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) * 2 <= limit \
                    or len(render_prompt(tokenizer, ex, system_prompt)) <= limit:
                kept.append(ex)
    finally:
        transformers_logging.set_verbosity(verbosity)
    dropped = len(examples) - len(kept)
    if not kept and examples:
        raise UserError(f"every prompt of {what} ({dropped}) is longer than {limit} tokens, the most that "
                        "--max-prompt-length and the model's context less --max-tokens allow; shorten the "
                        "prompts, raise --max-prompt-length or lower --max-tokens")
    return kept, dropped


LONGEST_RENDERED = 64  # prompts rendered at each end to find the shortest and longest in tokens, by characters


def prompt_token_range(tokenizer, examples: list[Example], system_prompt: str | None) -> tuple[int, int]:
    """The shortest and the longest rendered prompt in tokens, for the memory plan: the LONGEST_RENDERED
    shortest and longest in characters are rendered (rendering a whole data set would cost seconds)."""
    def characters(ex):
        return len(ex.prompt) if isinstance(ex.prompt, str) else sum(len(m["content"]) for m in ex.prompt)

    by_length = sorted(examples, key=characters)
    if len(by_length) > 2 * LONGEST_RENDERED:  # a small data set is rendered whole, each prompt once
        by_length = by_length[:LONGEST_RENDERED] + by_length[-LONGEST_RENDERED:]
    lengths = [len(render_prompt(tokenizer, ex, system_prompt)) for ex in by_length]
    return min(lengths, default=1), max(lengths, default=1)


def check_prompt_lengths(prompts: list[list[int]], limit: int | None) -> None:
    """Refuse a rendered prompt longer than `limit` before anything is allocated for it."""
    for ids in prompts:
        if limit is not None and len(ids) > limit:
            raise UserError(f"a prompt rendered to {len(ids)} tokens, more than the limit of {limit} (its chat "
                            "template takes more than half of it); raise --max-prompt-length or lower --max-tokens")
