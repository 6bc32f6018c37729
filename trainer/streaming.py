"""An answer shown as it is generated, exactly as the finished answer reads.

The finished answer is stripped of surrounding whitespace and cut before the first stop string (the
template's end-of-turn text, which generation may emit before it stops). Streamed text must read the
same, so an emitter holds back what it cannot yet know: leading whitespace, trailing whitespace, and
a tail that may be the start of a stop string; the rest goes out at once.
"""

from __future__ import annotations

from collections.abc import Callable


class StopAwareEmitter:
    def __init__(self, on_text: Callable[[str], None] | None, stop_strings: list[str]):
        self.on_text = on_text
        self.stops = [s for s in stop_strings if s]
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of the finished answer has gone out
        self.stopped = False

    def feed(self, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return
        self._send(self._safe_end())

    def finish(self) -> str:
        """The whole answer, with whatever was held back sent."""
        self._send(None)
        return self.text.strip()

    def _safe_end(self) -> int:
        """How much of the stripped answer is certain: no trailing whitespace, and no tail that a stop
        string may begin with."""
        body = self.text.strip()
        held = max((n for stop in self.stops for n in range(1, len(stop)) if body.endswith(stop[:n])), default=0)
        return len(body[:len(body) - held].rstrip())

    def _send(self, end: int | None) -> None:
        answer = self.text.strip()
        end = len(answer) if end is None else end
        if self.on_text and end > self.sent:
            self.on_text(answer[self.sent:end])
        self.sent = max(self.sent, end)
