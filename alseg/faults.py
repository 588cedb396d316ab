"""Named fault points for the fault-injection tests: where a run can die, it may be made to.

``point(name)`` does nothing unless the environment variable ``ALSEG_FAULT`` names that point
(``NAME`` or ``NAME@K`` for its K-th visit, 1-based), in which case the process kills itself
with SIGKILL right there, as a power cut or ``kill -9`` would. The tests use it to stop a run at
every step boundary and check that a resume ends exactly where an uninterrupted run ends.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_visits: Counter = Counter()


def point(name: str) -> None:
    wanted = os.environ.get("ALSEG_FAULT")
    if not wanted:
        return
    _visits[name] += 1
    target, _, k = wanted.partition("@")
    if target == name and _visits[name] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)
