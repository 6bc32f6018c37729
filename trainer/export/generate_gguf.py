"""`llamafarm generate --model model.gguf`: answer through llama.cpp with the template and stop strings
the export embedded (the training template's Jinja, its stop strings), no torch involved."""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import UserError
from trainer.export.gguf_model import STOP_STRINGS_KEY
from trainer.export.llamacpp import GgufModel


def render_prompt(jinja: str, messages: list[dict], bos: str, eos: str) -> str:
    # The same Jinja settings as transformers' apply_chat_template, so the text is the training text.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(jinja).render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=True)


def generate_gguf(path: Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    model = GgufModel(path, n_ctx=2048)
    meta = model.llm.metadata
    jinja = meta.get("tokenizer.chat_template")
    if not jinja:
        raise UserError(f"{path} carries no chat template; export it with `llamafarm finetune export`")
    bos = model.detokenize_special(model.bos)
    eos = model.detokenize_special(model.eos)
    text = render_prompt(jinja, [{"role": "user", "content": prompt}], bos, eos)
    ids = model.tokenize(text, bos)
    stops = [s for s in json.loads(meta.get(STOP_STRINGS_KEY, "[]")) if s]
    out = model.llm.create_completion(ids, max_tokens=max_new_tokens, temperature=temperature, top_k=1 if temperature == 0 else 40,
                                      stop=stops or None, seed=0)
    return out["choices"][0]["text"].strip()
