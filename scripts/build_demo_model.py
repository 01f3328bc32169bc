"""Build the embedded demo model, grpo_mlx/demo_model/: a ~1M-parameter Qwen2 that half knows addition.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/build_demo_model.py

(the OpenBLAS preload makes MLX's Linux CPU build ~30x faster; another BLAS may round
differently and so give a slightly different model).

1. A byte-level BPE tokenizer is trained on the arithmetic task rendered as ChatML turns.
2. A random-init float32 Qwen2 model gets a short supervised warm-start on
   `arithmetic_examples` ("What is 37 plus 48?" -> "85<|im_end|>"), loss on the completion only.
3. Training stops early on purpose: GRPO needs room to learn. The model writes well-formed
   answers but gets only a fraction of the held-out sums right, so rewards vary within a
   group and the demo's accuracy curve can climb.

Everything is seeded, so a rebuild gives the same model on the same machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

from grpo_mlx.data import arithmetic_examples
from grpo_mlx.tiny_model import DEMO_MODEL_DIR, chat_corpus, greedy_accuracy, save_model_dir, train_tokenizer

MODEL_ARGS = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, rms_norm_eps=1e-6,
                  max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)
# Tuned on a 2-core CPU: after 400 steps (~40 s) greedy accuracy is ~40%; at 600 it is ~95%,
# which would leave GRPO nothing to show. Batch 32 learns faster per second than 64.
STEPS, BATCH, LR, WARMUP = 400, 32, 1e-3, 50
TRAIN_SEED, HELDOUT_SEED = 1, 1234  # held-out set: arithmetic_examples(200, seed=1234)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
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
