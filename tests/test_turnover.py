"""The next round started from the review page (alseg.annotate.turnover): a worker process that
trains and selects under the server's lock, and resumes after a kill at any moment."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from annotate_fixtures import copy_project, png

from alseg.annotate.turnover import Turnover, needed
from alseg.errors import AlsegError
from alseg.project import Project, query
from alseg.rundir import RunDir
from alseg.store import RunStore

JOB_TIMEOUT = 300


def _labelled_copy(template, dest: Path) -> Path:
    """A copy of the template whose open batch the expert has finished."""
    project, truth = template
    path = copy_project(project, dest)
    with Project(path, command="test") as p:
        for id, mask in truth.items():
            p.submit(id, png(mask))
        assert p.batch().round == 1 and not p.store.queued(1)
    return path


def _wait(turnover: Turnover) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT
    while turnover.running():
        assert time.monotonic() < deadline, f"the worker is still running: {turnover.state()}"
        time.sleep(0.2)
    for _ in range(100):  # the follower thread records the outcome just after the worker exits
        state = turnover.state()
        if state["state"] != "running":
            return state
        time.sleep(0.05)
    return turnover.state()


def test_next_batch_is_made_under_the_servers_lock(template, tmp_path):
    path = _labelled_copy(template, tmp_path / "p")
    with Project(path, command="serve") as p:
        turnover = Turnover(p.dir.root, p._fd, log=lambda text: None)
        assert turnover.needed() and turnover.state()["state"] == "idle"
        assert turnover.start()
        assert not turnover.start(), "a second worker was started beside the first"
        seen_steps = set()
        deadline = time.monotonic() + JOB_TIMEOUT
        while turnover.running() and time.monotonic() < deadline:
            seen_steps.add(turnover.state()["step"])
            with pytest.raises(AlsegError, match="in use"):  # no other writer while the worker runs
                os.close(RunDir(path).acquire("query"))
            time.sleep(0.2)
        state = _wait(turnover)
        assert state["state"] == "done", state
        assert state["round"] == 2
        assert "training" in seen_steps, seen_steps
        batch = p.batch()
        assert batch.round == 2 and len(batch.items) == 8
        assert not turnover.needed(), "a batch awaits the expert: no next round is needed yet"
        assert p.status()["open_round"] == 2


def test_nothing_to_do_while_a_batch_awaits_labels(template, tmp_path):
    project, _ = template
    path = copy_project(project, tmp_path / "p")
    assert not needed(path)


_HARNESS = """
import sys, time
from alseg.annotate.turnover import Turnover
from alseg.project import Project
p = Project(sys.argv[1], command="serve")
t = Turnover(p.dir.root, p._fd, log=lambda text: None)
t.start()
while True:
    s = t.state()
    if s["step"] == "training" and (s["done"] or 0) >= 1:
        print("TRAINING", flush=True)
        break
    if s["state"] != "running":
        print("ENDED", s, flush=True)
        break
    time.sleep(0.05)
time.sleep(3600)
"""


def test_a_kill_during_training_resumes_to_the_same_batch(template, tmp_path):
    path = _labelled_copy(template, tmp_path / "killed")
    twin = copy_project(path, tmp_path / "twin")
    query(twin)  # the same steps without a kill
    server = subprocess.Popen([sys.executable, "-c", _HARNESS, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.strip() == "TRAINING", line
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    # the worker ends with its server, and the lock with it
    deadline = time.monotonic() + 15
    while True:
        try:
            os.close(RunDir(path).acquire("test"))
            break
        except AlsegError:
            assert time.monotonic() < deadline, "the worker outlived its server and holds the lock"
            time.sleep(0.2)
    with RunStore.open_readonly(path) as store:
        assert store.round_status(1) != "done", "the kill came after training, not during it"
    with Project(path, command="serve") as p:
        turnover = Turnover(p.dir.root, p._fd, log=lambda text: None)
        assert turnover.needed()
        assert turnover.start()
        assert _wait(turnover)["state"] == "done"
    with RunStore.open_readonly(path) as a, RunStore.open_readonly(twin) as b:
        assert a.selection(2, "expert") == b.selection(2, "expert")
        assert a.rounds()[1]["val_dice"] == b.rounds()[1]["val_dice"]
    shutil.rmtree(twin)
