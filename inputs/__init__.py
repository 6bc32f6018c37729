"""What users bring, datasets and base models, found, read and checked without torch.

The host (orchestrator/) and the trainer both read inputs through this package; nothing in it imports
torch, transformers or the trainer (tests/test_layers.py checks the import graph).
"""
