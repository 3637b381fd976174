"""User-facing errors.

Every problem a user can fix (a missing file, a corrupt checkpoint, an unknown config key) is raised as a
`BPError` whose message names the file or key and says what to do. The CLI prints it as one line and exits
non-zero; the UI shows it in place. Anything else is a bug and keeps its traceback (`--debug`).
"""

from __future__ import annotations

import os


class BPError(Exception):
    """An error caused by the user's input, with a message that is safe to show as one line."""

    exit_code = 2

    def __init__(self, message: str, *, path: "str | os.PathLike[str] | None" = None, hint: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class UnsafePickleError(BPError):
    """A `.ckpt`/`.pt` file needs code execution to load; it is refused, never executed."""


class ConfigError(BPError):
    """A run configuration is invalid (unknown key, wrong type, impossible value)."""
