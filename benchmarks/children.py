"""Benchmark jobs as child processes, a few at a time with one thread each (one per core)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def run_children(jobs: list[dict], parallel: int, *, script: str, extra_args: Callable[[dict], list[str]],
                 done: Callable[[dict], bool], label: Callable[[dict], str], tag: str) -> None:
    """Run ``script --one JOB`` (``extra_args(job)`` before ``--one``) for every job not ``done``,
    ``parallel`` at a time; on the first failure stop the others and exit with its stderr's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    todo = [j for j in jobs if not done(j)]
    running: list[tuple[dict, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            print(f"[{tag} {time.strftime('%H:%M:%S')}] {label(job)}", file=sys.stderr, flush=True)
            running.append((job, subprocess.Popen([sys.executable, script, *extra_args(job), "--one", json.dumps(job)],
                                                  env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)))
        time.sleep(2)
        for item in list(running):
            job, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other in running:
                    other.kill()
                sys.exit(f"{label(job)} failed: {proc.stderr.read()[-3000:]}")
