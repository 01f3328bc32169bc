"""Training: one GRPO step (sampling, loss, gradients, update) and the run around it (checkpoints, the run
directory, ranks)."""
