"""The CPU LoRA benchmark: a plain transformers Trainer + PEFT run against llamafarm on the same work.

    .venv/bin/python -m bench.cpu_lora
"""
