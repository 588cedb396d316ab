"""The next round, started from the review page: train on the labelled batch, select and export the next.

The review server (:mod:`alseg.annotate.server`) holds the project's writer lock for its lifetime,
so ``alseg query`` cannot run beside it. Instead the server starts :class:`Turnover`, which runs
the same durable steps as ``query`` (:meth:`alseg.active.loop.ActiveRun.run`: train, score, select,
export, stop at *awaiting labels*) in a worker process, while the page stays usable (browsing,
corrections of labelled images, which the next training reads when it starts).

The worker inherits the server's lock descriptor, so the lock stays held while either lives:
no other writer can start between them, and if the server dies the worker ends itself within a
second (it watches its parent), which releases the lock. Every step the worker commits is durable, so a kill
at any moment resumes where it stopped at the next start. The worker reports its progress as
JSON lines on stdout; the server keeps the latest as :meth:`Turnover.state`.

Run as ``python -m alseg.annotate.turnover PROJECT --parent PID`` (only the server does this).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from alseg.progress import Reporter

_STEP_NAMES = {"train epoch": "training", "pretrain": "pre-training"}


class _LineReporter(Reporter):
    """Progress as JSON lines on stdout (read by the server), at most a few per second."""

    def __init__(self):
        self._last = 0.0

    def _emit(self, **event) -> None:
        print(json.dumps(event), flush=True)

    def stage(self, name, total):
        self._emit(event="stage", step=_STEP_NAMES.get(name, name), done=0, total=total)

        def advance(done):
            now = time.monotonic()
            if done >= total or now - self._last > 0.25:
                self._last = now
                self._emit(event="progress", step=_STEP_NAMES.get(name, name), done=done, total=total)
        return advance

    def epoch(self, phase, round, record):
        self._emit(event="epoch", round=round, epoch=record.get("epoch"), val_dice=record.get("val_dice"))

    def note(self, text):
        self._emit(event="note", message=text)

    def round(self, row):
        self._emit(event="round", round=row.get("round"), val_dice=row.get("val_dice"))


def needed(project_dir: str | Path) -> bool:
    """Whether there is a next step to take: a labelled round to train, or a next batch to choose."""
    from alseg.store import RunStore

    with RunStore.open_readonly(project_dir) as store:
        rounds = store.rounds()
        if any(r["status"] == "awaiting" for r in rounds):
            return False  # the expert has a batch to finish first
        if any(r["status"] != "done" for r in rounds) or not rounds:
            return True
        return bool(store.counts()["pool"]) and store.stopped() is None


class Turnover:
    """One worker at a time that makes the next round of a project whose lock the caller holds."""

    def __init__(self, project_dir: str | Path, lock_fd: int | None, log=print):
        self.project_dir = Path(project_dir)
        self.lock_fd = lock_fd
        self.log = log
        self._proc: subprocess.Popen | None = None
        self._mutex = threading.Lock()
        self._state = {"state": "idle", "step": None, "done": None, "total": None, "message": None,
                       "round": None, "started": None, "finished": None}

    def needed(self) -> bool:
        return needed(self.project_dir)

    def running(self) -> bool:
        with self._mutex:
            return self._proc is not None and self._proc.poll() is None

    def state(self) -> dict:
        with self._mutex:
            return dict(self._state)

    def start(self) -> bool:
        """Start the worker (False if one is running already)."""
        with self._mutex:
            if self._proc is not None and self._proc.poll() is None:
                return False
            args = [sys.executable, "-m", "alseg.annotate.turnover", str(self.project_dir), "--parent", str(os.getpid())]
            self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          pass_fds=(self.lock_fd,) if self.lock_fd is not None else (),
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self._state = {"state": "running", "step": "starting", "done": None, "total": None, "message": None,
                           "round": None, "started": time.time(), "finished": None}
            proc = self._proc
        self.log("alseg review page: training the next round in the background")
        threading.Thread(target=self._follow, args=(proc,), daemon=True).start()
        return True

    def _follow(self, proc: subprocess.Popen) -> None:
        errors: list[str] = []
        stderr_reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        stderr_reader.start()
        result: dict = {}
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._mutex:
                kind = event.get("event")
                if kind in ("stage", "progress"):
                    self._state.update(step=event["step"], done=event["done"], total=event["total"])
                elif kind == "note":
                    self._state["message"] = event["message"]
                elif kind in ("done", "failed"):
                    result = event
        rc = proc.wait()
        stderr_reader.join(timeout=5)
        with self._mutex:
            if rc == 0 and result.get("event") == "done":
                self._state.update(state="done", step=None, done=None, total=None, round=result.get("round"),
                                   message=result.get("message"), finished=time.time())
            else:
                message = result.get("message") or (errors[-1].strip() if errors else f"the worker exited with {rc}")
                self._state.update(state="failed", message=message, finished=time.time())
        state = self.state()
        self.log(f"alseg review page: next round {state['state']}"
                 + (f": {state['message']}" if state["message"] else ""))

    def close(self) -> None:
        """Stop the worker, if one runs (its committed steps stay; the next start resumes)."""
        with self._mutex:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent(parent: int) -> None:
    """End this process within a second of the server's death (its lock then frees with it).

    Not ``PR_SET_PDEATHSIG``: that fires when the *thread* that started the worker ends, and the
    server starts it from a request thread of a pool whose idle threads exit."""
    if os.getppid() != parent:  # the server died before the worker got here
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _main(argv: list[str]) -> int:
    import argparse

    from alseg.active.loop import ActiveRun, open_active
    from alseg.annotate.ingest import latest_batch
    from alseg.errors import AlsegError
    from alseg.rundir import RunDir
    from alseg.store import RunStore

    parser = argparse.ArgumentParser(prog="python -m alseg.annotate.turnover")
    parser.add_argument("project")
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    reporter = _LineReporter()
    try:
        run_dir = RunDir(args.project).require()
        with RunStore(run_dir) as store:
            # the caller holds the writer lock and passed its descriptor: this process writes under it
            stopped = ActiveRun(store, open_active(store), reporter).run()
            batch = latest_batch(store)
        reporter._emit(event="done", stopped=stopped, round=batch.round if batch else None,
                       message=None if stopped == "awaiting labels" else f"stopped: {stopped}")
        return 0
    except AlsegError as exc:
        reporter._emit(event="failed", message=str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
