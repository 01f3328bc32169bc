"""Memory: the step's predicted peak (`estimate`) and the plan that fits a budget (`planner`). The package is
also the old path `grpo_mlx.memory`: it re-exports `estimate`.
"""

from .estimate import (
    KV_CACHE_STEP, LENGTH_BUCKET, LORA_BYTES, LOGIT_BYTES, SAVED_HIDDEN, SAVED_MLP, SAVED_QUERY,
    SAVED_KV, ATTENTION_SCORES_SAVED, TRANSIENT_HIDDEN, TRANSIENT_MLP, TRANSIENT_SCORES,
    HEAD_LOGITS_NO_GRAD, HEAD_LOGITS_GRAD, HEAD_CHUNK_GRAD, HEAD_CHUNK_GRAD_CAP,
    HEAD_LOGITS_GRAD_ROWS, DECODE_LOGITS, ModelShape, StepShape, matrix_bytes, weights_bytes,
    adapted_layers, lora_parameters, adapters_bytes, padded_width, rollout_bytes, pass_shape,
    layer_saved_bytes, layer_transient_bytes, pass_terms, head_positions, reference_bytes,
    policy_bytes, prefix_states_bytes, estimate_step,
)
