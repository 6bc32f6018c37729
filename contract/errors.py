"""User-facing errors: raised for anything a user can fix, printed without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. `str()` says what is wrong, where, and what to do."""


class StrategyError(UserError):
    """One or more invalid strategy values, each reported with its path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid strategy {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n{lines}")


class DatasetError(UserError):
    """A dataset that cannot be used, with file:line of the first problems."""
