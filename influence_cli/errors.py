"""One exception hierarchy; the CLI maps each class to an exit code in one place (cli_runtime.run_command)."""

from __future__ import annotations

from typing import ClassVar


class InflError(Exception):
    """Root of every error `infl` raises on purpose. `message` names the bad key, path or value."""

    exit_code: ClassVar[int] = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        if not message:
            raise TypeError("InflError needs a message")
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"


class ConfigError(InflError):
    """Bad usage or bad config: unknown key, wrong type, missing file. Exit code 2."""

    exit_code = 2


class DataError(InflError):
    """The data or model cannot be used: checkpoint mismatch, label out of range, NaN loss. Exit 3."""

    exit_code = 3


class NotFittedError(InflError):
    """A solver was used before `fit`: a programming error, reported like unusable input. Exit 3."""

    exit_code = 3
