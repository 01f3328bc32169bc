"""The model: loading, LoRA/DoRA and the reference mode (`policy`), token log-probs, GGUF conversion, fusing,
the demo and test models."""
