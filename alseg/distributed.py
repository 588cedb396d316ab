"""Running one alseg command over several processes (``torchrun``): who writes, and how work is shared.

``torchrun --nproc-per-node N -m alseg run ...`` starts N processes. :func:`init_from_env` joins
them into a process group (gloo on CPU, NCCL on CUDA, one GPU per process). Rank 0 runs the
command as usual and alone owns the run directory, its lock, the store and the checkpoints;
the other ranks only :func:`serve`: they wait for the collective steps rank 0 reaches and take
part in them. There are two:

* ``fit`` (:func:`alseg.train.fit`): DistributedDataParallel; every rank draws the same batch
  order and augmentation, takes every world-th image of each batch, and gradients are averaged,
  so an epoch sees the same images as on one process;
* ``mc`` (:func:`alseg.active.uncertainty.mc_dropout`): each rank scores every world-th pool
  image; dropout masks are seeded per image and pass, so the gathered scores equal one
  process's up to float rounding and the selection is the same.

While it leads (:func:`leading`), rank 0 announces each step (:func:`announce`) with what the
others need (arrays, weights); everything else (selection, evaluation, writing) happens on rank 0
only. A script that calls ``fit`` or ``mc_dropout`` on every rank itself (SPMD, like
``tests/distributed_scoring.py``) does not lead and nothing is announced. Without a process
group every function here is a no-op and alseg runs as one process.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

STOP = "stop"
_HANDLERS: dict[str, Callable[[dict], Any]] = {}
_LEADING = False


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process may write the run directory: rank 0, or the only process."""
    return rank_and_world()[0] == 0


def init_from_env() -> int:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1); return this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0
    if not dist.is_initialized():
        # Serving ranks wait in a broadcast while rank 0 works alone (evaluation, selection, a long
        # test split): the default 30-minute collective timeout would end them; a dead rank is
        # noticed by torchrun's agent, not by this timeout.
        timeout = datetime.timedelta(hours=float(os.environ.get("ALSEG_DIST_TIMEOUT_HOURS", "12")))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank()


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(message: Any) -> Any:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def leading():
    """Rank 0 drives the command while the other ranks :func:`serve`; they are released at the end,
    on an error too (a failure inside a collective step is left to torchrun, which stops the group)."""
    global _LEADING
    rank, world = rank_and_world()
    if world == 1 or rank != 0:
        yield
        return
    _LEADING = True
    try:
        yield
    finally:
        _LEADING = False
        _broadcast((STOP, {}))


def announce(op: str, payload: Callable[[], dict]) -> None:
    """While rank 0 leads, tell the serving ranks to join step ``op`` with ``payload()``; else nothing."""
    if _LEADING:
        _broadcast((op, payload()))


def handler(op: str):
    """Register how a serving rank takes part in step ``op``."""
    def register(fn: Callable[[dict], Any]):
        _HANDLERS[op] = fn
        return fn
    return register


def serve() -> None:
    """On ranks > 0: take part in each step rank 0 announces until it says stop."""
    import alseg.active.uncertainty  # noqa: F401  (registers "mc")
    import alseg.train  # noqa: F401  (registers "fit")

    while True:
        op, payload = _broadcast(None)
        if op == STOP:
            return
        _HANDLERS[op](payload)


def shutdown() -> None:
    """Leave the group together: a rank that tears its connections down while another still
    talks to it makes gloo abort that other process."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles hold the group: free them while it lives
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that was in a group. Interpreter teardown after the group is gone sometimes
    aborts in gloo's threads (``terminate called without an active exception``), turning a
    finished command into a failure: flush and leave without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
