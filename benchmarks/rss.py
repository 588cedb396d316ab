"""Resident memory of this process for the benchmarks: current and peak RSS from /proc (Linux)."""
from __future__ import annotations

import threading


def status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory (kB) inside a ``with`` block: VmHWM after resetting it, else sampled VmRSS."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak_kb, self.method = interval_s, None, None
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, status_kb("VmRSS") or 0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        if reset_peak_rss():
            self.method = "VmHWM after clear_refs"
        else:
            self.method = f"VmRSS sampled every {self.interval_s * 1000:.0f} ms"
            self._sampled = status_kb("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak_kb = status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak_kb = max(self._sampled, status_kb("VmRSS") or 0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
