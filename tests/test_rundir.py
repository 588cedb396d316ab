"""The writer lock of a run directory: one writer at a time, and a hold a caller may share with
the functions it calls (``alseg compare`` starts, adopts round 0 into and drives a run under one)."""
from __future__ import annotations

import importlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from alseg.errors import AlsegError
from alseg.rundir import LOCK_NAME, RunDir

compare_module = importlib.import_module("alseg.compare")  # the package exports the function `compare`


def _taken_elsewhere(run_dir: RunDir) -> dict[str, str]:
    """Try the lock from another thread and from another process; what each was told."""
    told = {}

    def other_thread() -> None:
        try:
            with run_dir.lock("thread"):
                told["thread"] = "taken"
        except AlsegError as exc:
            told["thread"] = str(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    proc = subprocess.run([sys.executable, "-c", "import sys; from alseg.rundir import RunDir\n"
                           f"try:\n    RunDir({str(run_dir.root)!r}).lock('process').__enter__()\n"
                           "except Exception as exc:\n    print(exc); sys.exit(0)\nprint('taken')"],
                          capture_output=True, text=True, check=True)
    told["process"] = proc.stdout.strip()
    return told


def test_a_plain_hold_refuses_every_second_take_even_in_its_own_thread(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.lock("serve"):
        with pytest.raises(AlsegError, match=r"in use by process \d+ \(alseg serve\)"):
            with run_dir.lock("ingest"):
                pass
        assert all("in use" in line for line in _taken_elsewhere(run_dir).values())
    assert _taken_elsewhere(run_dir) == {"thread": "taken", "process": "taken"}  # released


def test_a_shared_hold_lets_its_callees_in_and_nobody_else(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.lock("compare", shared_with_callees=True):
        with RunDir(tmp_path / ".." / tmp_path.name).lock("run"):  # the same folder, spelled otherwise
            told = _taken_elsewhere(run_dir)
            assert all("(alseg compare)" in line for line in told.values()), told
        # the callee's exit did not release the caller's hold
        assert all("in use" in line for line in _taken_elsewhere(run_dir).values())
    assert _taken_elsewhere(run_dir) == {"thread": "taken", "process": "taken"}
    with run_dir.lock("serve"):  # and the sharing ended with the hold
        with pytest.raises(AlsegError, match="in use"):
            with run_dir.lock("ingest"):
                pass


def test_compare_holds_a_runs_lock_from_start_to_finish(tmp_path, monkeypatch):
    run_path = tmp_path / "runs" / "random-s0"
    seen = []

    def step(name):
        def record(*args, **kwargs):
            told = _taken_elsewhere(RunDir(run_path))
            seen.append((name, told["thread"], told["process"]))
            if name == "start":
                (run_path / "run.db").write_bytes(b"")
            return name == "adopt" or {"rounds": []}
        return record

    monkeypatch.setattr(compare_module, "start_run", step("start"))
    monkeypatch.setattr(compare_module, "adopt_initial_round", step("adopt"))
    monkeypatch.setattr(compare_module, "run_active", step("run"))
    from alseg.config import build_config

    compare_module._make_active(build_config("quick-lgg", None, {}), "random", run_path, tmp_path / "donor",
                                compare_module.SILENT)
    assert [name for name, *_ in seen] == ["start", "adopt", "run"]
    for name, thread, process in seen:
        assert "(alseg compare)" in thread and "(alseg compare)" in process, (name, thread, process)
    assert sorted(p.name for p in run_path.iterdir()) == sorted([LOCK_NAME, "run.db"])
    assert _taken_elsewhere(RunDir(run_path)) == {"thread": "taken", "process": "taken"}
