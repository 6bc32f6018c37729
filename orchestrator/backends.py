"""Training backends, chosen by `fine_tuner.type`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    available: bool
    note: str
    runner: str | None = None
    """The runner every job of this backend uses; None: the usual choice (--runner, strategy, auto)."""


BACKENDS: dict[str, Backend] = {
    "pytorch": Backend(True, "llamafarm's own trainer (trainer/), LoRA, QLoRA or full"),
    "llamafactory": Backend(
        True,
        "LlamaFactory's own trainer (`llamafactory-cli train`) in a managed environment of its own "
        "(trainer/llamafactory/)",
        runner="llamafactory",
    ),
}
