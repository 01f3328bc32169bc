"""What every stage shares and none owns: the options (`config`), errors, plug-in loading, the atomic write. No MLX."""
