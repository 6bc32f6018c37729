"""Export of trained models: merged Hugging Face weights, GGUF (streamed, quantized), GGUF LoRA
adapters and Ollama folders, each verified against the PyTorch model with llama.cpp (run.py)."""
