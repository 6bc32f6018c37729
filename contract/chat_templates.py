"""Named chat templates: one object per template, the single source of truth for how a conversation
becomes text. Training renders data with it, `generate` renders prompts with it, and the export step
embeds the same Jinja text in the GGUF and derives the Ollama TEMPLATE and stop strings from it.

Templates are Hugging Face style Jinja (the `chat_template` of tokenizer_config.json), rendered by
the tokenizer's own `apply_chat_template`, so a model's own template and a named one take the same
path. Each must render incrementally: the text for the first k messages (with the generation prompt)
is a prefix of the text for all of them. That is what lets training mask every non-assistant token.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import UserError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    stop_strings: tuple[str, ...]
    """Text that ends an assistant turn, besides the tokenizer's EOS token."""
    description: str = ""
    ollama: str = ""
    """The same template as an Ollama (Go text/template) TEMPLATE over .Messages, with {BOS} and {EOS}
    standing for the tokenizer's texts. It leaves out the BOS that opens the prompt: Ollama (llama.cpp)
    adds that one from the GGUF's add_bos flag, and a second would change what the model sees."""

    def ollama_template(self, bos: str, eos: str) -> str:
        if not self.ollama:
            raise UserError(
                f"chat template {self.name!r} has no Ollama form; set dataset.template to one of "
                f"{', '.join(sorted(TEMPLATES))} (and retrain) to export to Ollama"
            )
        return self.ollama.replace("{BOS}", bos).replace("{EOS}", eos)


# When the strategy says template: auto and the model ships no chat template.
FALLBACK_TEMPLATE = "alpaca"

# The blank line between turns opens the next user block, so an assistant turn ends exactly at EOS.
_ALPACA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}"
    "\n\n{% endif %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Llama 2 chat: the system prompt sits inside the first [INST] block.
_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral instruct: no system role; a system message is put before the first user message.
_MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ bos_token }}{% for m in msgs %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral v0.3 (v3 tokenizer): [INST]/[/INST] are control tokens, no space before [/INST], one before
# the answer. Mistral puts the system prompt in the last user turn, which would change earlier text as
# a conversation grows; here it goes in the first, so every prefix of a conversation renders the same.
_MISTRAL_V3 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ bos_token }}{% for m in msgs %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# Gemma: roles user and model; no system role, so a system prompt opens the first user turn.
_GEMMA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ bos_token }}{% for m in msgs %}"
    "{% if m['role'] == 'user' %}<start_of_turn>user\n{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }}<end_of_turn>\n"
    "{% elif m['role'] == 'assistant' %}<start_of_turn>model\n{{ m['content'] }}<end_of_turn>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Phi-3: <|role|> blocks closed by <|end|> (Phi-3's own template also appends EOS after a finished
# conversation, which no prompt prefix has; left out so training and inference render alike).
_PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The Ollama forms. Go's text/template keeps every character outside {{ }}, so these are written
# without trim markers; $prev / $first carry what the Jinja reads from the previous message.
_ALPACA_GO = (
    '{{ $prev := "" }}{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ .Content }}\n\n'
    '{{ else if eq .Role "user" }}{{ if eq $prev "assistant" }}\n{{ end }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
    '{{ else if eq .Role "assistant" }}{{ .Content }}{EOS}{{ end }}{{ $prev = .Role }}{{ end }}'
)
_CHATML_GO = (
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_LLAMA3_GO = (
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
_LLAMA2_GO = (
    '{{ $sys := "" }}{{ $first := true }}{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ $sys = .Content }}'
    '{{ else if eq .Role "user" }}{{ if not $first }}{BOS}{{ end }}[INST] '
    '{{ if and $first $sys }}<<SYS>>\n{{ $sys }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]{{ $first = false }}'
    '{{ else if eq .Role "assistant" }} {{ .Content }} {EOS}{{ end }}{{ end }}'
)
_MISTRAL_GO = (
    '{{ $sys := "" }}{{ $first := true }}{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ $sys = .Content }}'
    '{{ else if eq .Role "user" }}[INST] {{ if and $first $sys }}{{ $sys }}\n\n{{ end }}{{ .Content }} [/INST]'
    '{{ $first = false }}{{ else if eq .Role "assistant" }}{{ .Content }}{EOS}{{ end }}{{ end }}'
)

_MISTRAL_V3_GO = (
    '{{ $sys := "" }}{{ $first := true }}{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ $sys = .Content }}'
    '{{ else if eq .Role "user" }}[INST] {{ if and $first $sys }}{{ $sys }}\n\n{{ end }}{{ .Content }}[/INST]'
    '{{ $first = false }}{{ else if eq .Role "assistant" }} {{ .Content }}{EOS}{{ end }}{{ end }}'
)
_GEMMA_GO = (
    '{{ $sys := "" }}{{ $first := true }}{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ $sys = .Content }}'
    '{{ else if eq .Role "user" }}<start_of_turn>user\n{{ if and $first $sys }}{{ $sys }}\n\n{{ end }}{{ .Content }}'
    '<end_of_turn>\n{{ $first = false }}'
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
    '<start_of_turn>model\n'
)
_PHI3_GO = "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("alpaca", _ALPACA, ("### Instruction:",), "Stanford Alpaca instruction/response blocks", _ALPACA_GO),
        ChatTemplate("chatml", _CHATML, ("<|im_end|>",), "ChatML (<|im_start|>role ... <|im_end|>), Qwen, SmolLM", _CHATML_GO),
        ChatTemplate("llama3", _LLAMA3, ("<|eot_id|>",), "Llama 3 header blocks ending in <|eot_id|>", _LLAMA3_GO),
        ChatTemplate("llama2", _LLAMA2, ("[INST]",), "Llama 2 chat [INST] blocks with <<SYS>>", _LLAMA2_GO),
        ChatTemplate("mistral", _MISTRAL, ("[INST]",), "Mistral instruct [INST] blocks", _MISTRAL_GO),
        ChatTemplate("mistral-v3", _MISTRAL_V3, ("[INST]",), "Mistral v0.3 [INST]...[/INST] with control tokens", _MISTRAL_V3_GO),
        ChatTemplate("gemma", _GEMMA, ("<end_of_turn>",), "Gemma <start_of_turn>user/model turns", _GEMMA_GO),
        ChatTemplate("phi3", _PHI3, ("<|end|>",), "Phi-3 <|user|>/<|assistant|> blocks closed by <|end|>", _PHI3_GO),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(
            f"unknown chat template {name!r}; valid names: auto, {', '.join(sorted(TEMPLATES))}"
        ) from None


def model_template(jinja: str, eos_token: str | None) -> ChatTemplate:
    """A model's own chat template; its turns end with the tokenizer's EOS token."""
    return ChatTemplate("model", jinja, (eos_token,) if eos_token else (), "the base model's own chat template")
