"""Conversations to token ids and labels, through the chat template, with prompt tokens masked.

The template renders the whole conversation once; rendering it incrementally gives the character
span of every assistant turn. The text is tokenized once (with offsets), and a token carries loss
when it overlaps an assistant span, so the ids are exactly those that inference would see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.chat_templates import FALLBACK_TEMPLATE, ChatTemplate, get_template, model_template
from contract.errors import UserError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    source_tokens: int = 0
    """Tokens of every row before any cut, so tokens / source_tokens is the share trained."""
    text_blocks: int = 0
    """max_seq_length blocks cut from plain-text rows (dataset.text_mode: blocks)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def share_trained(self) -> float:
        return self.tokens / self.source_tokens if self.source_tokens else 1.0


def choose_template(name: str, tokenizer) -> tuple[ChatTemplate, str]:
    """The template to use and the reason, for the log."""
    if name != "auto":
        return get_template(name), f"template: {name} (set in the strategy)"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return model_template(own, tokenizer.eos_token), "template: the model's own chat template"
    return get_template(FALLBACK_TEMPLATE), f"template: {FALLBACK_TEMPLATE} (the model has no chat template)"


class ConversationEncoder:
    def __init__(self, tokenizer, template: ChatTemplate, max_seq_length: int, train_on_inputs: bool, truncation: str,
                 text_mode: str = "truncate"):
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_length = max_seq_length
        self.train_on_inputs = train_on_inputs
        self.truncation = truncation
        self.text_mode = text_mode
        self.eos_id = tokenizer.eos_token_id

    def render(self, messages, add_generation_prompt: bool = False, tools=()) -> str:
        if (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)) and "tool" not in self.template.jinja:
            raise UserError(
                f"chat template {self.template.name!r} has no tool-calling form, so rows with tools cannot be "
                "rendered; set dataset.template to chatml or llama3 (or use a model whose template handles tools)"
            )
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template.jinja, tokenize=False,
            add_generation_prompt=add_generation_prompt, tools=list(tools) or None,
        )

    def _tokenize(self, text: str):
        # A template that writes BOS itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)

    def assistant_spans(self, messages, tools=()) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character span of every assistant turn (tool calls included; tool results,
        which are not the model's words, never)."""
        full = self.render(messages, tools=tools)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            through = self.render(messages[: i + 1], tools=tools)
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise UserError(
                    f"chat template {self.template.name!r} does not render conversations incrementally, "
                    "so prompt tokens cannot be masked; choose a named template (dataset.template)"
                )
            spans.append((len(before), len(through)))
        return full, spans

    def encode(self, messages, tools=()) -> tuple[list[int], list[int]]:
        """input_ids and labels (IGNORE_INDEX outside assistant turns), before any length limit."""
        text, spans = self.assistant_spans(messages, tools)
        enc = self._tokenize(text)
        ids = list(enc["input_ids"])
        labels = []
        for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
            in_answer = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
            labels.append(token_id if (in_answer or self.train_on_inputs) else IGNORE_INDEX)
        if self.eos_id is not None and spans:
            # Every answer must end in EOS so generation stops; add it where the template does not.
            last = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < spans[-1][1] and e > spans[-1][0]]
            if not last or self.eos_id not in ids[last[0] : last[-1] + 1]:
                insert_at = last[-1] + 1 if last else len(ids)
                ids.insert(insert_at, self.eos_id)
                labels.insert(insert_at, self.eos_id)
        return ids, labels

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """A plain-text row: no template, every token in the loss, EOS at the end."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids, list(ids)

    def prompt_ids(self, messages, tools=()) -> list[int]:
        """Ids of a conversation ready for the assistant's next turn (for generation)."""
        return list(self._tokenize(self.render(messages, add_generation_prompt=True, tools=tools))["input_ids"])

    def encode_row(self, conv) -> tuple[list[int], list[int]]:
        return self.encode_text(conv.text) if conv.text is not None else self.encode(list(conv.messages), conv.tools)

    def _blocks(self, stream: list[int], stats: EncodeStats) -> list[tuple[list[int], list[int]]]:
        """Pretraining convention: the documents, each ending in EOS, as one stream cut into full
        max_seq_length blocks; the shorter remainder is the last block, so no token is thrown away."""
        n = self.max_seq_length
        blocks = [stream[i : i + n] for i in range(0, len(stream), n)]
        blocks = [b for b in blocks if len(b) > 1]  # a lone token has nothing to predict
        stats.text_blocks = len(blocks)
        return [(b, list(b)) for b in blocks]

    def encode_all(self, conversations) -> tuple[list[tuple[list[int], list[int]]], EncodeStats]:
        rows, stats, stream = [], EncodeStats(), []
        for conv in conversations:
            ids, labels = self.encode_row(conv)
            stats.rows += 1
            stats.source_tokens += len(ids)
            if conv.text is not None and self.text_mode == "blocks":
                stream.extend(ids)
                continue
            if len(ids) > self.max_seq_length:
                if self.truncation == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped_no_target += 1
                continue
            stats.tokens += len(ids)
            stats.target_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
            stats.lengths.append(len(ids))
            rows.append((ids, labels))
        for ids, labels in self._blocks(stream, stats) if stream else ():
            stats.tokens += len(ids)
            stats.target_tokens += len(ids) - 1
            stats.lengths.append(len(ids))
            rows.append((ids, labels))
        if not rows:
            raise UserError(
                f"no usable rows: {stats.dropped_too_long} longer than max_seq_length={self.max_seq_length} "
                f"(dropped), {stats.dropped_no_target} with no answer tokens left after truncation; "
                "raise training_args.max_seq_length or set dataset.truncation: truncate"
            )
        return rows, stats
