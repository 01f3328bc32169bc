"""Build the embedded demo models: grpo_mlx/demo_model/ (addition) or, with --tools, grpo_mlx/demo_tools_model/.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/build_demo_model.py [--tools]

(the OpenBLAS preload makes MLX's Linux CPU build ~30x faster; another BLAS may round
differently and so give a slightly different model).

1. A byte-level BPE tokenizer is trained on the arithmetic task rendered as ChatML turns.
2. A random-init float32 Qwen2 model gets a short supervised warm-start on
   `arithmetic_examples` ("What is 37 plus 48?" -> "85<|im_end|>"), loss on the completion only.
3. Training stops early on purpose: GRPO needs room to learn. The model writes well-formed
   answers but gets only a fraction of the held-out sums right, so rewards vary within a
   group and the demo's accuracy curve can climb.

With --tools, the tool demo's model for `--dataset multiplication --tools calculator`:
1. The tokenizer is trained on multiplication transcripts rendered as ChatML, including the
   ToolEnvironment's fenced-format system prompt, ```calc calls and ```output observations.
2. The warm start mixes (a) transcripts that call the calculator ("347 * 2816"), see the
   product in an ```output block (context, no loss) and copy it as the answer, and (b) direct
   answers: the product from "memory", which a small model cannot learn. The loss is on the
   model's own turns only. The calculator is used on TOOL_SHARE_LOW of the problems whose first
   factor is below 400 and TOOL_SHARE_HIGH of the others (37% in all), so the built model calls
   it on ~30% of held-out problems greedily (~36% sampled), copies the output right ~95% of
   the time and never gets a product from memory: GRPO can raise both tool use and accuracy.
3. `eval.demo.tool_episode_accuracy` (greedy and sampled trajectories against the real
   calculator) is printed every --eval-every steps: what TOOL_STEPS was chosen from (at 600
   steps copying was still ~80% right; shares 0.6/0.1 gave tool use too rare and noisy).
   ~20 min on a busy 2-core CPU: the system prompt, shared by every row, is run once a batch.

Everything is seeded, so a rebuild gives the same model on the same machine.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import KVCache, make_prompt_cache

from grpo_mlx.data.examples import HELD_OUT_SEED_OFFSET, arithmetic_examples, multiplication_examples
from grpo_mlx.envs.environments import FENCED_FORMAT, ToolEnvironment, run_episode
from grpo_mlx.eval.demo import greedy_accuracy, tool_episode_accuracy
from grpo_mlx.model.tiny_model import DEMO_MODEL_DIR, DEMO_TOOLS_MODEL_DIR, IM_END, chat_corpus, render_chat, save_model_dir, train_tokenizer
from grpo_mlx.envs.tools import CALCULATOR

MODEL_ARGS = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, rms_norm_eps=1e-6,
                  max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)
# Tuned on a 2-core CPU: after 400 steps (~40 s) greedy accuracy is ~40%; at 600 it is ~95%,
# which would leave GRPO nothing to show. Batch 32 learns faster per second than 64.
STEPS, BATCH, LR, WARMUP = 400, 32, 1e-3, 50
TRAIN_SEED, HELDOUT_SEED = 1, 1234  # held-out set: arithmetic_examples(200, seed=1234)

# --tools: the same shape; longer transcripts (108-145 tokens, 85 of them the system prompt).
TOOL_MODEL_ARGS = {**MODEL_ARGS, "max_position_embeddings": 512}
TOOL_STEPS, TOOL_LR, TOOL_WARMUP = 1200, 1e-3, 50
TOOL_SHARE_LOW, TOOL_SHARE_HIGH = 0.8, 0.15  # share of warm-start problems solved with the calculator
TOOL_HELDOUT_SEED = HELD_OUT_SEED_OFFSET  # the multiplication test split of seed 0: what eval measures
TOOL_TRAIN_SEED = 1


def encode(tokenizer, ex):
    """(prompt + completion ids, prompt length): the completion is the answer then <|im_end|>."""
    prompt = tokenizer.encode(f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n").ids
    return prompt + tokenizer.encode(f"{ex.answer}<|im_end|>").ids, len(prompt)


def batches(tokenizer, examples, batch_size, pad_id):
    """Right-padded (tokens, loss mask) batches; the mask selects targets in the completion."""
    for i in range(0, len(examples) - batch_size + 1, batch_size):
        rows = [encode(tokenizer, ex) for ex in examples[i:i + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        tokens = mx.array([ids + [pad_id] * (width - len(ids)) for ids, _ in rows])
        lengths, starts = mx.array([len(ids) for ids, _ in rows]), mx.array([p for _, p in rows])
        pos = mx.arange(1, width)[None]  # position of each target token
        yield tokens, (pos >= starts[:, None]) & (pos < lengths[:, None])


def loss_fn(model, tokens, mask):
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
    return ce.sum() / mask.sum()


def tool_transcript(example, env, use_tool: bool) -> list[dict]:
    """The warm-start conversation for `example`: a calculator call, its output and the copied product,
    or the product written directly. Played through the real ToolEnvironment."""
    a, b = example.meta["a"], example.meta["b"]
    turns = [f"```calc\n{a} * {b}\n```", example.answer] if use_tool else [example.answer]
    episode = run_episode(env, example, turns, max_turns=3)
    assert episode.done and episode.turns == len(turns), episode
    return episode.messages


def transcript_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is the model's own) pieces whose concatenation is the rendered conversation: the prompt,
    then each model turn with its <|im_end|> (own), then what follows it up to the next turn (context).
    Encoded piece by piece, as the rollout encodes them: generated turns, then prefilled observations."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    segments = [(render_chat(messages[:first], add_generation_prompt=True), False)]
    previous = first
    for i, message in enumerate(messages[first:], first):
        if message["role"] != "assistant":
            continue
        if i > first:  # what came between the previous turn and this one, up to this one's prompt
            segments.append(("\n" + render_chat(messages[previous + 1:i], add_generation_prompt=True), False))
        segments.append((message["content"] + IM_END, True))
        previous = i
    assert "".join(text for text, _ in segments) == render_chat(messages)[:-1]
    return segments


def tool_rows(tokenizer, transcripts: list[list[dict]]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, is-target flag per token) for each transcript."""
    rows = []
    for messages in transcripts:
        ids, own = [], []
        for text, is_own in transcript_segments(messages):
            piece = tokenizer.encode(text).ids
            ids += piece
            own += [is_own] * len(piece)
        rows.append((ids, own))
    return rows


def shared_prefix_length(rows) -> int:
    """Tokens every row starts with (the system prompt), less one: the last is an input whose logits predict."""
    first = rows[0][0]
    n = 0
    while all(len(ids) > n and ids[n] == first[n] for ids, _ in rows):
        n += 1
    return max(n - 1, 0)


def tool_batches(rows, batch_size, prefix_length):
    """Per batch, groups of equal-length rows as (tokens, loss mask) after the shared prefix.

    Grouping by length needs no padding: a tool transcript is ~60 tokens past the system
    prompt, a direct answer ~25, so padding them together would double the work.
    """
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        by_length: dict[int, list] = {}
        for ids, own in rows[i:i + batch_size]:
            by_length.setdefault(len(ids), []).append((ids[prefix_length:], own[prefix_length + 1:]))
        yield [(mx.array([ids for ids, _ in group]), mx.array([own for _, own in group]))
               for _, group in sorted(by_length.items())]


def shared_prefix_loss(model, prefix, groups):
    """`loss_fn` over all `groups`, the shared `prefix` (the system prompt) run once, not once per row.

    The prefix's keys and values are computed at batch size 1 and repeated for each group;
    gradients flow through them, so this equals running every full row (checked to ~1e-7).
    """
    base = make_prompt_cache(model)
    model(prefix[None], cache=base)
    total, count = mx.array(0.0), mx.array(0)
    for tokens, mask in groups:
        cache = []
        for layer in base:
            kv = KVCache()
            kv.keys = mx.repeat(layer.keys[..., :layer.offset, :], tokens.shape[0], axis=0)
            kv.values = mx.repeat(layer.values[..., :layer.offset, :], tokens.shape[0], axis=0)
            kv.offset = layer.offset
            cache.append(kv)
        logits = model(tokens[:, :-1], cache=cache).astype(mx.float32)
        total = total + (nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask).sum()
        count = count + mask.sum()
    return total / count


def report_tool_model(path, heldout, label):
    """Held-out greedy and sampled (temperature 1) tool-episode numbers, the model loaded as users load it."""
    from mlx_lm import load
    model, wrapped = load(str(path))
    line = [label]
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        r = tool_episode_accuracy(model, wrapped, heldout, temperature=temperature, seed=0)
        fmt = lambda v: "  -  " if v is None else f"{v:5.1%}"
        line.append(f"{name}: tool {fmt(r['tool_rate'])} acc {fmt(r['accuracy'])} "
                    f"(with tool {fmt(r['accuracy_with_tool'])}, without {fmt(r['accuracy_without_tool'])})")
    print("  ".join(line), flush=True)


def build_tools(args):
    start = time.perf_counter()
    mx.random.seed(0)
    env = ToolEnvironment([CALCULATOR], FENCED_FORMAT)
    choice = random.Random(TOOL_TRAIN_SEED)
    heldout = multiplication_examples(args.heldout, seed=TOOL_HELDOUT_SEED)
    seen = {(ex.meta["a"], ex.meta["b"]) for ex in multiplication_examples(500, seed=TOOL_HELDOUT_SEED)}
    train = [ex for ex in multiplication_examples(args.steps * BATCH * 11 // 10, seed=TOOL_TRAIN_SEED)
             if (ex.meta["a"], ex.meta["b"]) not in seen]
    transcripts = [tool_transcript(ex, env, choice.random() < (TOOL_SHARE_LOW if ex.meta["a"] < 400
                                                               else TOOL_SHARE_HIGH)) for ex in train]
    corpus = [render_chat(m) for m in transcripts[:3000]]
    tokenizer = train_tokenizer(corpus)
    rows = tool_rows(tokenizer, transcripts)
    model_args = {**TOOL_MODEL_ARGS, "vocab_size": tokenizer.get_vocab_size()}
    model = qwen2.Model(qwen2.ModelArgs.from_dict(model_args))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    lengths = sorted(len(ids) for ids, _ in rows)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; model: {n_params:,} parameters; "
          f"transcripts {lengths[0]}-{lengths[-1]} tokens ({shared_prefix_length(rows)} shared); tool share {sum(len(t) > 3 for t in transcripts) / len(transcripts):.1%}")

    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, TOOL_LR, TOOL_WARMUP),
         optim.cosine_decay(TOOL_LR, args.steps - TOOL_WARMUP, TOOL_LR / 10)], [TOOL_WARMUP])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, shared_prefix_loss)
    prefix_length = shared_prefix_length(rows)
    prefix = mx.array(rows[0][0][:prefix_length])
    for step, groups in enumerate(tool_batches(rows, BATCH, prefix_length), start=1):
        loss, grads = loss_and_grad(model, prefix, groups)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:5.1f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            save_model_dir(args.scratch, model, model_args, tokenizer)
            report_tool_model(args.scratch, heldout, f"step {step:4d}")
        if step == args.steps:
            break

    save_model_dir(args.out, model, model_args, tokenizer)
    report_tool_model(args.out, heldout, f"saved {args.out}:")
    print(f"{n_params:,} parameters, {len(heldout)} held-out problems, built in {time.perf_counter() - start:.1f}s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools", action="store_true", help="build the tool demo's model (demo_tools_model)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="--tools: measure a checkpoint every N steps")
    parser.add_argument("--heldout", type=int, default=200, help="--tools: held-out problems measured")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/grpo_mlx_tool_demo_checkpoint"))
    args = parser.parse_args()
    if args.tools:
        args.out = args.out or DEMO_TOOLS_MODEL_DIR
        args.steps = args.steps or TOOL_STEPS
        return build_tools(args)
    args.out = args.out or DEMO_MODEL_DIR
    args.steps = args.steps or STEPS
    start = time.perf_counter()
    mx.random.seed(0)

    tokenizer = train_tokenizer(chat_corpus(2000, seed=TRAIN_SEED))
    heldout = arithmetic_examples(200, seed=HELDOUT_SEED)
    # Keep held-out sums out of training, so accuracy measures addition, not recall.
    seen = {(ex.meta["a"], ex.meta["b"]) for ex in heldout}
    train = [ex for ex in arithmetic_examples(args.steps * BATCH * 11 // 10, seed=TRAIN_SEED)
             if (ex.meta["a"], ex.meta["b"]) not in seen]

    model = qwen2.Model(qwen2.ModelArgs.from_dict({**MODEL_ARGS, "vocab_size": tokenizer.get_vocab_size()}))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; model: {n_params:,} parameters")

    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, LR, WARMUP), optim.cosine_decay(LR, args.steps - WARMUP, LR / 10)], [WARMUP])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    pad_id = tokenizer.token_to_id("<|endoftext|>")
    for step, (tokens, mask) in enumerate(batches(tokenizer, train, BATCH, pad_id), start=1):
        loss, grads = loss_and_grad(model, tokens, mask)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:5.1f}s", flush=True)
        if step == args.steps:
            break

    save_model_dir(args.out, model, {**MODEL_ARGS, "vocab_size": tokenizer.get_vocab_size()}, tokenizer)
    # Score the model as users will see it: reloaded through mlx-lm, its chat template and EOS ids.
    from mlx_lm import load
    model, wrapped = load(str(args.out))
    accuracy = greedy_accuracy(model, wrapped, heldout)
    print(f"saved {args.out}: {n_params:,} parameters, held-out greedy accuracy {accuracy:.1%} "
          f"({len(heldout)} problems), built in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
