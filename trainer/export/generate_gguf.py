"""`llamafarm generate --model model.gguf`: answer through llama.cpp with the template and stop strings
the export embedded (the training template's Jinja, its stop strings), no torch involved."""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import UserError
from trainer.export.gguf_model import STOP_STRINGS_KEY
from trainer.export.llamacpp import GgufModel
from trainer.sampling import llamacpp_kwargs


def render_prompt(jinja: str, messages: list[dict], bos: str, eos: str) -> str:
    # The same Jinja settings as transformers' apply_chat_template, so the text is the training text.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(jinja).render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=True)


def _modelfile_parameters(path: Path) -> dict:
    """The sampling PARAMETERs of the Modelfile beside an exported GGUF (an Ollama export folder)."""
    from contract.strategy import OllamaSpec

    modelfile = path.with_name("Modelfile")
    if not modelfile.is_file():
        return {}
    found = {}
    for line in modelfile.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "PARAMETER" and parts[1] in OllamaSpec.model_fields and parts[1] != "stop":
            found[parts[1]] = parts[2]
    return found


def sampling_for(path: Path, greedy: bool, seed: int | None, temperature: float | None):
    """Ollama's settings for this GGUF: its Modelfile's PARAMETERs where it has one, else the schema's."""
    from contract.strategy import OllamaSpec
    from trainer.sampling import Sampling

    params = _modelfile_parameters(path)
    if temperature is not None:
        params["temperature"] = temperature
    spec = OllamaSpec.model_validate({k: v for k, v in params.items() if k != "num_ctx"})
    return Sampling.from_spec(spec, greedy, seed)


def generate_gguf(path: Path, prompt: str, max_new_tokens: int = 128, sampling=None, on_text=None) -> str:
    """The answer, through llama.cpp; with `on_text`, each piece as it is generated (trainer.streaming)."""
    from trainer.streaming import StopAwareEmitter

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    model = GgufModel(path, n_ctx=2048, last_n_tokens=sampling.repeat_last_n)
    meta = model.llm.metadata
    jinja = meta.get("tokenizer.chat_template")
    if not jinja:
        raise UserError(f"{path} carries no chat template; export it with `llamafarm finetune export`")
    bos = model.detokenize_special(model.bos)
    eos = model.detokenize_special(model.eos)
    text = render_prompt(jinja, [{"role": "user", "content": prompt}], bos, eos)
    ids = model.tokenize(text, bos)
    stops = [s for s in json.loads(meta.get(STOP_STRINGS_KEY, "[]")) if s]
    emitter = StopAwareEmitter(on_text, stops)
    for chunk in model.llm.create_completion(ids, max_tokens=max_new_tokens, stop=stops or None, stream=True,
                                             **llamacpp_kwargs(sampling)):
        emitter.feed(chunk["choices"][0]["text"])
    return emitter.finish()
