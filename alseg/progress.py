"""How long-running library calls report progress without knowing who listens.

Library functions take an optional :class:`Reporter`; the default one is silent. The CLI
passes one that draws rich progress bars and tables.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


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

    def round(self, row: dict) -> None:
        """A finished active-learning round (round, expert_labelled, pseudo_labelled, pool, test, seconds)."""


class TeeReporter(Reporter):
    """Passes every event to several reporters (e.g. progress bars and TensorBoard)."""

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def stage(self, name, total):
        advances = [r.stage(name, total) for r in self.reporters]
        return lambda done: [a(done) for a in advances] and None

    def end_stage(self):
        for r in self.reporters:
            r.end_stage()

    def epoch(self, phase, round, record):
        for r in self.reporters:
            r.epoch(phase, round, record)

    def note(self, text):
        for r in self.reporters:
            r.note(text)

    def round(self, row):
        for r in self.reporters:
            r.round(row)


SILENT = Reporter()


@contextmanager
def staged(reporter: Reporter, name: str, total: int) -> Iterator[Callable[..., None]]:
    """A stage that always ends, also on an error (a live bar must not garble the error line).

    Yields ``advance(done, *ignored)``, which also fits ``load_cached``'s ``progress(done, total)``.
    """
    advance = reporter.stage(name, total)
    try:
        yield lambda done, *_: advance(done)
    finally:
        reporter.end_stage()


def batch_progress(reporter: Reporter) -> Callable[[int, int], None]:
    """An ``on_batch(step, steps)`` callback for :func:`alseg.train.fit`: one bar per epoch."""
    state: dict = {}

    def on_batch(step: int, steps: int) -> None:
        if step == 1:
            state["advance"] = reporter.stage("train epoch", steps)
        state["advance"](step)
        if step == steps:
            reporter.end_stage()

    return on_batch
