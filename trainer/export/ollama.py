"""The Ollama Modelfile of an export, derived from the template that shaped the training data.

TEMPLATE is the Go form of that same template (contract/chat_templates.py); a model's own Jinja
template is matched to the named template that renders identically, or the export is refused,
because a guessed template is the most common reason an exported model answers with garbage.
One `PARAMETER stop` per stop string, `num_ctx` from the training length, SYSTEM and sampling
values from the strategy's export.ollama section.
"""

from __future__ import annotations

import json

from contract.chat_templates import TEMPLATES, ChatTemplate
from contract.errors import UserError
from contract.strategy import Strategy

# Conversations that tell templates apart: system prompt, multi-turn, odd whitespace.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


def ollama_form(template: ChatTemplate, render) -> ChatTemplate:
    """`template` itself when it has an Ollama form, else the named template that renders the same.
    `render(jinja, messages)` renders a Jinja chat template with the model's tokenizer."""
    if template.ollama:
        return template
    own = [render(template.jinja, m) for m in PROBE_CONVERSATIONS]
    for named in TEMPLATES.values():
        if [render(named.jinja, m) for m in PROBE_CONVERSATIONS] == own:
            return named
    raise UserError(
        "the model's own chat template matches none of the named templates, so no Ollama TEMPLATE can be "
        f"derived from it exactly; train with dataset.template set to one of {', '.join(sorted(TEMPLATES))}"
    )


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a double-quoted string with escapes, as Modelfiles take


def modelfile(template: ChatTemplate, bos: str, eos: str, strategy: Strategy, gguf_name: str = "model.gguf",
              adapter: str | None = None) -> str:
    spec = strategy.cfg.export.ollama
    stops = list(dict.fromkeys([*template.stop_strings, eos]))
    go = template.ollama_template(bos, eos)
    if '"""' in go:
        raise UserError("the chat template contains three double quotes in a row, which a Modelfile cannot hold")
    lines = [f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f'TEMPLATE """{go}"""')
    if spec.system:
        lines.append(f'SYSTEM """{spec.system}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    lines.append(f"PARAMETER num_ctx {spec.num_ctx or strategy.cfg.training_args.max_seq_length}")
    for key in ("temperature", "top_p", "top_k", "repeat_penalty", "repeat_last_n", "seed"):
        value = getattr(spec, key)
        if value is not None:
            lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
