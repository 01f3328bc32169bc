"""A memory model of one grpo-mlx training step, from the model's shape and the run's settings.

`estimate_step` predicts `mx.get_peak_memory()` of one `trainer.grpo_step` as the largest
of its three phases, each the whole memory in use at its high point (weights included):

- rollout: B*G rows decode together; their KV cache (mlx-lm's caches grow in steps of
  256 positions) twice, since dropping a finished row copies it, plus the decode step's [N, V]
  logits, log-softmax and sampling arrays;
  the prompt prefill runs the model's body only (no [P, V] logits) and is small;
- reference: the log-prob pass without gradient (beta > 0), one micro-batch at a time;
  one layer's intermediates are alive at once, then the float32 logits;
- policy: forward + backward of one micro-batch, at the LM head's backward: every
  adapted block's saved activations (or only each block's input under gradient
  checkpointing), the attention scores, and the head's float32 logits and gradient.

With beta > 0 and adapters on the last blocks only, both log-prob phases also hold the frozen
blocks' output of the whole batch (`prefix_states_bytes`, one hidden vector per token).

Pure arithmetic on shapes: no MLX call, so `grpo-mlx plan` runs before any model loads.
Activations are counted per token and per adapted layer and multiplied by the layer count
explicitly, so a measurement on a model cut to a few layers extrapolates to the whole one
(scripts/memory_check.py checks it at 1, 2 and 4 layers).

Backend: measured on the CPU, where MLX's scaled_dot_product_attention is its composite
fallback and materialises [rows, heads, queries, keys] scores, whose softmax the
backward keeps (`ATTENTION_SCORES_SAVED`). Metal's fused kernel forms no scores in the
forward, so there this term over-predicts (not measured here); the head's blocks are
plain float32 arrays on every backend. The fitted counts (`HEAD_LOGITS_*`) assume
gradients.accumulate_gradients evaluates the forward's outputs before the gradient:
evaluated together, MLX's schedule kept 0-2 more [rows, positions, V] blocks alive
depending on the layer count (1: +0, 2: +1, 3: +2, 4: +0 ... measured on Qwen2.5-0.5B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KV_CACHE_STEP = 256  # mlx-lm's KVCache/BatchKVCache grow in steps of this many positions
LENGTH_BUCKET = 32  # gradients.LENGTH_BUCKET: the trainer pads a batch to multiples of this
LORA_BYTES = 4  # LoRA A/B matrices are float32 whatever the model's dtype (mlx-lm's LoRALinear)
LOGIT_BYTES = 4  # log-probs are taken on float32 logits (logprobs._score_targets casts)

# Per token and per adapted block, the activations the backward keeps (in units of the
# hidden size h, the MLP width I, the query width Hq*d, the key/value width Hkv*d),
# counted from mlx-lm's Llama/Qwen2 block and MLX's vjps; frozen matmuls keep no input.
SAVED_HIDDEN = 4  # block input, attention norm out (LoRA A's input), mid residual, MLP norm out
SAVED_MLP = 5  # gate, up, sigmoid(gate), silu(gate), silu*up (down's LoRA input)
SAVED_QUERY = 2  # scaled queries (for the scores' vjp), attention output (o_proj's LoRA input)
SAVED_KV = 2  # keys and values, over every key position
ATTENTION_SCORES_SAVED = 1  # the softmax of the scores (CPU fallback sdpa)
# The largest set of one layer's arrays alive at once in a pass without gradient.
TRANSIENT_HIDDEN = 3
TRANSIENT_MLP = 3  # gate, up, their product
TRANSIENT_SCORES = 2  # scores and their softmax (CPU fallback sdpa)
# [rows, positions, V] float32 blocks alive at the LM head's high point (measured on Qwen2.5-0.5B's and
# Llama-3.2-1B's shapes, 1-4 layers, CPU). Without gradient: the logits, while the last block's
# intermediates are still alive (Qwen 1.15, Llama 1.4 blocks, covered by 1 block + one layer's
# transients). With gradient: the saved logits plus their gradient, exp(logits - lse): 2.1-2.2 in a
# pass alone (Qwen, Llama); in whole steps 1.8-3.3 (the schedule of MLX's lazy graph varies; the largest
# error of this model, +-0.5 block).
HEAD_LOGITS_NO_GRAD = 1.0
HEAD_LOGITS_GRAD = 2.1
# With `logits_chunk` the gradient pass holds chunks, not the whole logits: logprobs.head_logprobs
# recomputes each chunk's logits in its backward. Measured (Qwen2-shaped, vocabularies 16k and 32k, 8
# rows): 8.3-10.2 [rows, chunk, V] float32 blocks at chunks of 8-32 positions (two chunks' logits,
# exp and softmax overlap in MLX's schedule), never more than 4.3 blocks of all the positions.
HEAD_CHUNK_GRAD = 9.5
HEAD_CHUNK_GRAD_CAP = 4.3
# The row-by-row path (no shared prompt: logprobs.token_logprobs with the head split) keeps more at its
# head: 2.5-3.1 blocks measured in whole steps (Llama-3.2-1B, 1-layer Qwen2.5-1.5B: random weights can fail
# supports_shared_prompt's check there).
HEAD_LOGITS_GRAD_ROWS = 2.7
# [N, V] arrays alive in a decode step: logits, log-softmax (current and next), sampler's noise and scaled logits.
DECODE_LOGITS = 5


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    bits: int | None = None  # weight quantization; None: unquantized
    group_size: int = 64
    dtype_bytes: int = 4  # unquantized weights' bytes per element (float32: 4, bfloat16/float16: 2)
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a config.json dict ("quantization" key when quantized)."""
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        quantization = config.get("quantization") or config.get("quantization_config") or {}
        dtype = str(config.get("torch_dtype", config.get("dtype", "float32")))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bits=quantization.get("bits"),
            group_size=quantization.get("group_size", 64),
            dtype_bytes=4 if "32" in dtype else 2,
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        )

    @property
    def query_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> list[tuple[int, int]]:
        """(input, output) sizes of a block's linear layers: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.query_width), (h, self.kv_width), (h, self.kv_width), (self.query_width, h),
                (h, i), (h, i), (i, h)]


@dataclass(frozen=True)
class StepShape:
    batch_size: int  # B prompts per step
    group_size: int  # G completions per prompt
    prompt_tokens: int  # the longest prompt, chat template included
    max_tokens: int  # completion tokens
    micro_batch_size: int  # rows per forward/backward
    grad_checkpoint: bool = False
    shared_prompt: bool = True  # a group's prompt runs once in the log-prob passes
    reference_pass: bool = True  # beta > 0
    lora_rank: int = 8
    lora_layers: int = 16  # blocks with adapters, counted from the last; -1 all
    logits_chunk: int | None = None  # LM-head positions per chunk in the log-prob passes; None: all at once
    kv_bits: int | None = None  # rollout KV-cache quantization
    shortest_prompt: int | None = None  # the shortest prompt of a batch; None: prompt_tokens (no spread)
    share_frozen_prefix: bool = True  # the frozen blocks' output is kept for the log-prob passes (frozen_prefix.py)
    # Each micro-batch runs only as wide as its longest row (gradients.micro_batch_widths); False under
    # --compile, where the widths round up to LENGTH_BUCKET.
    trimmed: bool = True


# ---------------------------------------------------------------- resident


def matrix_bytes(model: ModelShape, rows: int, cols: int) -> int:
    """A [rows, cols] weight: dtype elements, or packed `bits` plus a scale and a bias per group."""
    if model.bits is None:
        return rows * cols * model.dtype_bytes
    groups = rows * (cols // model.group_size)
    return rows * cols * model.bits // 8 + 2 * groups * model.dtype_bytes


def weights_bytes(model: ModelShape) -> int:
    """Every base weight: embeddings, blocks (linears, q/k/v biases, two norms), final norm, untied LM head."""
    h = model.hidden_size
    block = sum(matrix_bytes(model, out, inp) for inp, out in model.block_linears())
    block += 2 * h * model.dtype_bytes  # the two RMSNorm weights
    if model.qkv_bias:
        block += (model.query_width + 2 * model.kv_width) * model.dtype_bytes
    embeddings = matrix_bytes(model, model.vocab_size, h)
    head = 0 if model.tie_word_embeddings else matrix_bytes(model, model.vocab_size, h)
    return embeddings + model.num_layers * block + h * model.dtype_bytes + head


def adapted_layers(model: ModelShape, step: StepShape) -> int:
    """Blocks with adapters (counted from the last): the blocks the backward runs through."""
    if step.lora_layers < 0:
        return model.num_layers
    return min(step.lora_layers, model.num_layers)


def lora_parameters(model: ModelShape, step: StepShape) -> int:
    """LoRA A [in, r] and B [r, out] on each linear of each adapted block (mlx-lm's default keys)."""
    per_block = sum(step.lora_rank * (inp + out) for inp, out in model.block_linears())
    return adapted_layers(model, step) * per_block


def adapters_bytes(model: ModelShape, step: StepShape) -> int:
    # parameters, AdamW's two moments, the accumulated gradient and one micro-batch's gradient
    return 5 * lora_parameters(model, step) * LORA_BYTES


# ---------------------------------------------------------------- phases


def padded_width(step: StepShape) -> int:
    """Tokens per row of the training batch: prompt + completion, padded to LENGTH_BUCKET."""
    return -(-(step.prompt_tokens + step.max_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET


def rollout_bytes(model: ModelShape, step: StepShape) -> int:
    """KV cache of B*G rows at its longest and its copy without a finished row, the B prompt caches,
    and the decode step's [N, V] arrays."""
    rows = step.batch_size * step.group_size
    act = model.dtype_bytes
    kv_elem_bytes = act if step.kv_bits is None else step.kv_bits / 8 + 2 * act / 64  # packed + scale/bias per 64
    per_position = 2 * model.kv_width * kv_elem_bytes  # keys and values, one layer
    # The merged cache holds P-1 prompt positions and grows by whole 256-position steps.
    cache_positions = step.prompt_tokens - 1 + KV_CACHE_STEP * math.ceil(step.max_tokens / KV_CACHE_STEP)
    batch_cache = rows * cache_positions * per_position * model.num_layers
    # When a row stops, mlx-lm's BatchGenerator copies the cache without it (`BatchKVCache.filter`) while
    # the old one is still referenced: a second cache at the high point (SmolLM2-135M, 32 rows of 64
    # tokens: 1.76 GB measured, 1.20 GB when no row stops early). Dwarfs one layer's growth copy.
    filtered_copy = (rows - 1) * cache_positions * per_position * model.num_layers
    # Each prompt's own prefill cache (256-position steps) stays referenced until the rollout returns.
    prompt_cache = step.batch_size * KV_CACHE_STEP * math.ceil(step.prompt_tokens / KV_CACHE_STEP) \
        * 2 * model.kv_width * act * model.num_layers
    decode = DECODE_LOGITS * rows * model.vocab_size * LOGIT_BYTES
    return int(batch_cache + filtered_copy + prompt_cache + decode)


def pass_shape(step: StepShape) -> dict:
    """Rows and widths of one micro-batch's log-prob pass.

    Shared prompt (logprobs.group_token_logprobs): one call runs the micro-batch's
    prompts once each, left-padded to the longest; a second runs every row's completion
    against its group's prompt keys and values, right-padded to the widest completion (the
    micro-batch's longest row minus its shortest prompt: at most the longest prompt + T minus
    the shortest, exactly T within one group). Otherwise every row runs prompt + completion,
    and the LM head sees positions from the shortest prompt's end on.
    """
    width = step.prompt_tokens + step.max_tokens if step.trimmed else padded_width(step)
    rows = step.micro_batch_size
    # A micro-batch within one group runs from its own prompt's end: no other prompt's spread.
    one_group = step.shared_prompt and step.trimmed and step.group_size % rows == 0
    shortest = step.prompt_tokens if one_group else (step.shortest_prompt or step.prompt_tokens)
    completion = width - shortest  # positions per completion row, scored or padding
    if step.shared_prompt:
        prompt_rows = math.ceil(rows / step.group_size)
        prompt = step.prompt_tokens - 1
        return dict(prompt_rows=prompt_rows, prompt=prompt, rows=rows, queries=completion,
                    keys=prompt + completion, scored=completion)
    start = (shortest - 1) // LENGTH_BUCKET * LENGTH_BUCKET  # gradients.first_scored_position
    return dict(prompt_rows=0, prompt=0, rows=rows, queries=width - 1, keys=width - 1, scored=width - 1 - start)


def layer_saved_bytes(model: ModelShape, tokens: int, key_positions: int, scores: int) -> int:
    """One adapted block's activations kept for the backward: per-token terms plus the attention scores."""
    per_token = (SAVED_HIDDEN * model.hidden_size + SAVED_MLP * model.intermediate_size
                 + SAVED_QUERY * model.query_width)
    return (tokens * per_token + key_positions * SAVED_KV * model.kv_width
            + scores * ATTENTION_SCORES_SAVED) * model.dtype_bytes


def layer_transient_bytes(model: ModelShape, tokens: int, key_positions: int, scores: int) -> int:
    """One block's largest set of intermediates in a pass without gradient."""
    per_token = TRANSIENT_HIDDEN * model.hidden_size + TRANSIENT_MLP * model.intermediate_size \
        + model.query_width
    return (tokens * per_token + key_positions * 2 * model.kv_width + scores * TRANSIENT_SCORES) * model.dtype_bytes


def pass_terms(model: ModelShape, step: StepShape) -> dict:
    """Per-layer tokens, key positions and attention-score elements of one micro-batch."""
    s = pass_shape(step)
    tokens = s["prompt_rows"] * s["prompt"] + s["rows"] * s["queries"]
    # keys/values the attention reads: the prompt pass's own, each completion row's gathered prompt + completion
    key_positions = s["prompt_rows"] * s["prompt"] + s["rows"] * s["keys"]
    scores = model.num_heads * (s["prompt_rows"] * s["prompt"] ** 2 + s["rows"] * s["queries"] * s["keys"])
    scored = s["rows"] * s["scored"]
    return dict(tokens=tokens, key_positions=key_positions, scores=scores, scored=scored)


def head_positions(step: StepShape, scored: int) -> int:
    """LM-head positions whose [*, V] logits exist at once: a chunk's rows, or all."""
    if step.logits_chunk is None:
        return scored
    return min(scored, step.micro_batch_size * step.logits_chunk)


def reference_bytes(model: ModelShape, step: StepShape, resident: int) -> int:
    """Log-probs without gradient: the prompt keys/values kept for the completion call, the float32
    logits (a chunk's with logits_chunk) and, still alive beside them, one layer's intermediates."""
    t = pass_terms(model, step)
    s = pass_shape(step)
    prompt_kv = s["prompt_rows"] * s["prompt"] * 2 * model.kv_width * model.dtype_bytes * model.num_layers
    layer = layer_transient_bytes(model, t["tokens"], t["key_positions"], t["scores"])
    head = HEAD_LOGITS_NO_GRAD * head_positions(step, t["scored"]) * model.vocab_size * LOGIT_BYTES
    return resident + prompt_kv + layer + head


def policy_bytes(model: ModelShape, step: StepShape, resident: int) -> int:
    """Forward + backward of one micro-batch, at the LM head's backward (the high point measured).

    Without checkpointing every adapted block keeps its activations until the backward,
    so they are all alive under the head's backward. With it each block keeps its input
    (and a shared prompt's keys and values) only; the backward recomputes one block at a
    time, the last one possibly while the head's logits are still alive.
    """
    t = pass_terms(model, step)
    s = pass_shape(step)
    layers = adapted_layers(model, step)
    one_layer = layer_saved_bytes(model, t["tokens"], t["key_positions"], t["scores"])
    # The saved logits plus their gradient's blocks; with `logits_chunk`, a few chunks' worth (the
    # backward recomputes each chunk: logprobs.head_logprobs).
    blocks = HEAD_LOGITS_GRAD if step.shared_prompt else HEAD_LOGITS_GRAD_ROWS
    head = blocks * t["scored"] * model.vocab_size * LOGIT_BYTES
    if step.logits_chunk is not None:
        chunked = min(HEAD_CHUNK_GRAD * head_positions(step, t["scored"]), HEAD_CHUNK_GRAD_CAP * t["scored"])
        head = min(head, chunked * model.vocab_size * LOGIT_BYTES)
    if not step.grad_checkpoint:
        return resident + layers * one_layer + head
    block_input = (t["tokens"] * model.hidden_size + s["prompt_rows"] * s["prompt"] * 2 * model.kv_width) \
        * model.dtype_bytes
    # MLX may recompute the last block (it needs only that block's input) while the head's logits and their
    # gradient are still alive: max(head, one_layer) measured 16.6% under on 4 layers of Qwen2.5-0.5B.
    return resident + layers * block_input + head + one_layer


def prefix_states_bytes(model: ModelShape, step: StepShape) -> int:
    """The frozen blocks' output of every micro-batch (model/frozen_prefix.py): one hidden vector per token
    the body runs, laid out from the rollout's (or recorded by the reference pass) and kept through the policy
    passes. The rollout's own per-row copy is smaller than its KV cache by about 2 x kv_width x layers /
    hidden (SmolLM2: 20x) and is dropped once laid out: not counted."""
    if not (step.share_frozen_prefix and step.reference_pass) or adapted_layers(model, step) >= model.num_layers:
        return 0
    micro_batches = math.ceil(step.batch_size * step.group_size / step.micro_batch_size)
    return micro_batches * pass_terms(model, step)["tokens"] * model.hidden_size * model.dtype_bytes


def estimate_step(model: ModelShape, step: StepShape) -> dict[str, int]:
    """Bytes: 'weights', 'adapters' (LoRA params + grads + AdamW state), then each phase's peak
    ('rollout', 'reference', 'policy' — the whole memory in use at that phase's high point,
    weights included) and 'peak' = max of the phases: the step's predicted mx.get_peak_memory()."""
    weights = weights_bytes(model)
    adapters = adapters_bytes(model, step)
    resident = weights + adapters
    states = prefix_states_bytes(model, step)
    phases = {
        "rollout": resident + rollout_bytes(model, step),
        "reference": reference_bytes(model, step, resident + states) if step.reference_pass else resident,
        "policy": policy_bytes(model, step, resident + states),
    }
    return {"weights": weights, "adapters": adapters, **{k: int(v) for k, v in phases.items()},
            "peak": int(max(phases.values()))}
