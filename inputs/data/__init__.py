"""Dataset files: formats, rows, tool calls, placeholders, LlamaFactory registries (no torch)."""
