"""Old path of the demo models, kept for scripts: the models and their tokenizer live in
`grpo_mlx.model.tiny_model`, measuring them on their tasks in `grpo_mlx.eval.demo`."""

from .eval.demo import decode_turns, greedy_accuracy, greedy_answers, tool_episode_accuracy, tool_episodes  # noqa: F401
from .model.tiny_model import (  # noqa: F401
    CHAT_TEMPLATE, DEMO_MODEL_DIR, DEMO_TOOLS_MODEL_DIR, IM_END, IM_START, PAD, QWEN2_SPLIT, chat_corpus, demo_model_path, make_tiny_model, render_chat,
    save_model_dir, train_tokenizer, write_model_dir,
)
