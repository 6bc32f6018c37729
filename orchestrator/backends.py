"""Training backends, chosen by `fine_tuner.type`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    available: bool
    note: str


BACKENDS: dict[str, Backend] = {
    "pytorch": Backend(True, "llamafarm's own trainer (trainer/), LoRA, QLoRA or full"),
    "llamafactory": Backend(
        False,
        "LlamaFactory's trainer in an environment of its own; not available in this version yet. "
        "Use fine_tuner.type: pytorch, which accepts the same settings",
    ),
}
