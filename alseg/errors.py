"""The one error type users see: a file (or other subject) and the problem with it.

Lower layers raise :class:`AlsegError` for bad input; the CLI renders it as a single
line and exits non-zero. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class AlsegError(Exception):
    """Bad input or an impossible request, with the file it concerns when there is one."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        # a file name that is not valid UTF-8 (undecodable bytes kept as surrogates) is shown with
        # U+FFFD in their place: the line must print on any terminal
        self.path = None if path is None else str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
