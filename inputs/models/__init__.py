"""Base model sources: builtins, GGUF files and Ollama stores, model folders, the build-once cache (no torch)."""
