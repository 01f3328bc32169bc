"""The embedded demos' settings: applied by `config.build_config` to the fields a user left unset, only
without --model. No MLX."""

# The embedded demo: a 0.8M-parameter model on 2-digit addition, tuned so reward
# rises visibly within minutes on 2 CPU cores. Applied only to fields the user
# left unset, and only when no --model is given.
# What it reaches (sampled reward, held-out greedy accuracy) and how fast: README's "Set up", the
# one place those figures are kept. Greedy accuracy dips for the first ~50 steps while GRPO
# reshapes the sampling distribution; 3e-4 and above collapse this small model, 1e-4 does not.
DEMO_PRESET = {
    "dataset": "arithmetic",
    "steps": 300,
    "batch_size": 8,
    "group_size": 8,
    "max_tokens": 8,
    "learning_rate": 1e-4,
    "lora_rank": 8,
    "lora_layers": -1,
    "beta": 0.0,
    "save_every": 50,
    "output": "runs/demo",
}

# The tool demo: `grpo-mlx train --dataset multiplication --tools calculator` with no --model
# trains the embedded grpo_mlx/demo_tools_model (`tiny_model.demo_model_path(tools=True)`), a
# 0.8M-parameter model warm-started to call the calculator on ~1 problem in 3 (fenced format)
# and to copy its output. Applied like DEMO_PRESET: only to fields the user left unset, only
# without --model, and instead of DEMO_PRESET when --tools is given. A call turn is ~14
# tokens and an answer ~8, so 24 tokens a turn and 3 turns (call, answer, one spare) suffice.
# What it reaches (tool calls, sampled reward, held-out greedy accuracy with the tool): README's
# "Tool demo", the one place those figures are kept. 3e-4 collapses it within 10 steps (the model
# garbles the factors it copies into the call); 1e-4 does not.
DEMO_TOOLS_PRESET = {
    "dataset": "multiplication",
    "tools": ["calculator"],
    "max_turns": 3,
    "max_trajectory_tokens": 128,  # call + output + answer is ~45 tokens; the default bound (584) overflows the 512-token context
    "steps": 50,
    "batch_size": 8,
    "group_size": 8,
    "max_tokens": 24,
    "learning_rate": 1e-4,
    "lora_rank": 8,
    "lora_layers": -1,
    "beta": 0.0,
    "save_every": 25,
    "output": "runs/demo-tools",
}
