"""How long-running library calls report progress without knowing who listens.

Library functions take an optional :class:`Reporter`; the default one is silent. The CLI
passes one that draws rich progress bars and tables.
"""
from __future__ import annotations

from typing import Callable


class Reporter:
    """Silent reporter: subclass and override what you want to show."""

    def stage(self, name: str, total: int) -> Callable[[int], None]:
        """Announce a stage of ``total`` steps; call the returned function with the steps done."""
        return lambda done: None

    def end_stage(self) -> None:
        pass

    def epoch(self, phase: str, round: int, record: dict) -> None:
        pass

    def note(self, text: str) -> None:
        pass


SILENT = Reporter()
