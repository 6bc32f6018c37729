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

def _keep_newlines(jinja: str) -> str:
    """Hugging Face renders with trim_blocks, which eats the newline right after a tag; written as an
    expression it stays, as the Ollama form needs."""
    return jinja.replace("%}\n", "%}{{ '\\n' }}")


# Tool definitions and call arguments are written as compact JSON with sorted keys: that is what
# Ollama's `json` template function (Go's json.Marshal of a map) writes, so both forms give one text.
_JSON = "tojson(separators=(',', ':'), sort_keys=True)"

# Qwen2.5's tool format: the tools in the system block, calls in <tool_call> tags, results as a user
# block of <tool_response> tags (consecutive results share one block).
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FORMAT = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call><|im_end|>\n"
)
# The conversation after the system block: tool results grouped in user blocks, calls after content.
_CHATML_TURNS = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif not (tools and m['role'] == 'system') %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{% if m['content'] or not loop.first %}\n{% endif %}"
    "<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": {{ c['function']['arguments'] | " + _JSON + " }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TOOLS_LIST = "{% for t in tools %}\n{{ t | " + _JSON + " }}{% endfor %}" + _TOOLS_FORMAT


def _chatml(default_system: str = "") -> str:
    """ChatML with Qwen's tools block; `default_system`: the system text when the conversation has none
    (Qwen2.5 writes its own, with or without tools; Qwen3 none)."""
    if not default_system:
        return _keep_newlines(
            "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
            "{% endif %}" + _TOOLS_PREAMBLE + _TOOLS_LIST + "{% endif %}" + _CHATML_TURNS)
    return _keep_newlines(
        "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}" + default_system + "{% endif %}\n\n" + _TOOLS_PREAMBLE + _TOOLS_LIST
        + "{% elif messages[0]['role'] != 'system' %}<|im_start|>system\n" + default_system + "<|im_end|>\n"
        "{% endif %}" + _CHATML_TURNS)


_CHATML = _chatml()
_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN25 = _chatml(_QWEN25_SYSTEM)

# Llama 3.1's tool format: the tools in the first user message, a call as {"name", "parameters"}
# JSON, results in an ipython block.
_LLAMA3_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}. Do not use variables.\n\n"
)
_LLAMA3 = _keep_newlines(
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% elif m['tool_calls'] %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if m['content'] %}{{ m['content'] }}\n{% endif %}{% for c in m['tool_calls'] %}{% if not loop.first %}\n{% endif %}"
    "{\"name\": \"{{ c['function']['name'] }}\", \"parameters\": {{ c['function']['arguments'] | " + _JSON + " }}}"
    "{% endfor %}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if tools and m['role'] == 'user' and (loop.index0 == 0 or (loop.index0 == 1 and messages[0]['role'] == 'system')) %}"
    + _LLAMA3_TOOLS_INTRO + "{% for t in tools %}{{ t | " + _JSON + " }}\n\n{% endfor %}{% endif %}"
    "{{ m['content'] }}<|eot_id|>{% endif %}"
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

# ChatML that opens with a default system message when the conversation has none (SmolLM2's own
# template renders exactly this).
_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_CHATML_DEFAULT_SYSTEM = (
    "{% if messages and messages[0]['role'] != 'system' %}<|im_start|>system\n" + _SMOLLM2_SYSTEM + "<|im_end|>\n"
    "{% endif %}" + _CHATML
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
# With tools: .Tools and each message's .ToolCalls, JSON through Ollama's `json` function. A run of
# tool results is closed when the next message (or the end) comes, instead of looking ahead.
_CHATML_TURNS_GO = (
    '{{ $prev := "" }}{{ range .Messages }}'
    '{{ if and (eq $prev "tool") (ne .Role "tool") }}<|im_end|>\n{{ end }}'
    '{{ if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
    '\n<tool_response>\n{{ .Content }}\n</tool_response>'
    '{{ else if not (and $.Tools (eq .Role "system")) }}<|im_start|>{{ .Role }}\n{{ .Content }}'
    '{{ $content := .Content }}{{ range $j, $c := .ToolCalls }}{{ if or $content $j }}\n{{ end }}'
    '<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}\n</tool_call>{{ end }}'
    '<|im_end|>\n{{ end }}{{ $prev = .Role }}{{ end }}'
    '{{ if eq $prev "tool" }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
)
_TOOLS_LIST_GO = _TOOLS_PREAMBLE + '{{ range .Tools }}\n{{ json . }}{{ end }}' + _TOOLS_FORMAT
_CHATML_GO = (
    '{{ if .Tools }}<|im_start|>system\n{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq .Role "system") }}'
    '{{ .Content }}\n\n{{ end }}{{ end }}' + _TOOLS_LIST_GO + '{{ end }}' + _CHATML_TURNS_GO
)
_QWEN25_GO = (
    '{{ $first := index .Messages 0 }}{{ if .Tools }}<|im_start|>system\n'
    '{{ if eq $first.Role "system" }}{{ $first.Content }}{{ else }}' + _QWEN25_SYSTEM + '{{ end }}\n\n' + _TOOLS_LIST_GO
    + '{{ else if ne $first.Role "system" }}<|im_start|>system\n' + _QWEN25_SYSTEM + '<|im_end|>\n{{ end }}'
    + _CHATML_TURNS_GO
)
_CHATML_DEFAULT_SYSTEM_GO = (
    '{{ if ne (index .Messages 0).Role "system" }}<|im_start|>system\n' + _SMOLLM2_SYSTEM + "<|im_end|>\n{{ end }}"
    + _CHATML_GO
)
_LLAMA3_GO = (
    '{{ $first := true }}{{ range .Messages }}'
    '{{ if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
    '{{ else if .ToolCalls }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ if .Content }}{{ .Content }}\n{{ end }}'
    '{{ range $j, $c := .ToolCalls }}{{ if $j }}\n{{ end }}'
    '{"name": "{{ .Function.Name }}", "parameters": {{ json .Function.Arguments }}}{{ end }}<|eot_id|>'
    '{{ else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    '{{ if and $.Tools $first (eq .Role "user") }}' + _LLAMA3_TOOLS_INTRO + '{{ range $.Tools }}{{ json . }}\n\n{{ end }}{{ end }}'
    '{{ .Content }}<|eot_id|>{{ end }}{{ if eq .Role "user" }}{{ $first = false }}{{ end }}{{ end }}'
    '<|start_header_id|>assistant<|end_header_id|>\n\n'
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
        ChatTemplate("chatml", _CHATML, ("<|im_end|>",),
                     "ChatML (<|im_start|>role ... <|im_end|>), Qwen3 (tool format, no thinking blocks), SmolLM", _CHATML_GO),
        ChatTemplate("qwen2.5", _QWEN25, ("<|im_end|>",),
                     "ChatML with Qwen2.5's default system message and its tool format", _QWEN25_GO),
        ChatTemplate("chatml-smollm2", _CHATML_DEFAULT_SYSTEM, ("<|im_end|>",),
                     "ChatML with SmolLM2's default system message when none is given", _CHATML_DEFAULT_SYSTEM_GO),
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
