"""Multi-turn environments, the tools a model may call, and the sandbox the python tool runs in."""
