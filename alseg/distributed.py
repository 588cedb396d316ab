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
import functools
import gc
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

STOP = "stop"
_HANDLERS: dict[str, Callable[[dict], Any]] = {}
_LEADING = False
_OPEN_STEPS = 0  # collective steps entered and not yet returned from, on this rank


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
            # gloo for CPU tensors (objects, `--device cpu` on a GPU machine), NCCL for CUDA ones
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank()


def local_device(device: torch.device) -> torch.device:
    """In a group, CUDA means this rank's own GPU (torchrun gives each process one), whatever index
    the command named; elsewhere ``device`` unchanged."""
    if device.type == "cuda" and rank_and_world()[1] > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


def _scatter(shares: list | None) -> Any:
    box = [None]
    dist.scatter_object_list(box, shares, src=0)
    return box[0]


def collective(fn: Callable) -> Callable:
    """Mark ``fn`` as a collective step: while it runs every rank takes part, so a failure inside it
    cannot be answered by releasing the others (they are inside DDP's all-reduce or a gather, not
    waiting for orders): the process ends at once and torchrun stops the group."""
    @functools.wraps(fn)
    def step(*args, **kwargs):
        global _OPEN_STEPS
        _OPEN_STEPS += 1
        result = fn(*args, **kwargs)
        _OPEN_STEPS -= 1  # only on success: a step left open marks this rank out of step
        return result
    return step


@contextlib.contextmanager
def leading():
    """Rank 0 drives the command while the other ranks :func:`serve`; they are released at the end,
    or on an error between steps. An error inside a step ends the group (see :func:`collective`)."""
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
        if not _OPEN_STEPS:
            _broadcast((STOP, {}, False))


def announce(op: str, payload: Callable[[], dict], shares: Callable[[int, int], dict] | None = None) -> None:
    """While rank 0 leads, tell the serving ranks to join step ``op`` with ``payload()``, and, with
    ``shares``, send rank r only ``shares(r, world)`` (its part of the pool); else nothing."""
    if not _LEADING:
        return
    _broadcast((op, payload(), shares is not None))
    if shares is not None:
        world = rank_and_world()[1]
        _scatter([shares(r, world) for r in range(world)])


def handler(op: str):
    """Register how a serving rank takes part in step ``op``: ``fn(payload)`` (with its share
    merged into the payload when rank 0 sent shares)."""
    def register(fn: Callable[[dict], Any]):
        _HANDLERS[op] = fn
        return fn
    return register


def serve() -> None:
    """On ranks > 0: take part in each step rank 0 announces until it says stop. A failure here
    ends this process at once (torchrun then stops the group): rank 0 is inside the same step.
    The steps' handlers are registered by their modules (``alseg.train``: "fit",
    ``alseg.active.uncertainty``: "mc"), which the caller has imported: this module imports none."""
    while True:
        op, payload, has_shares = _broadcast(None)
        if op == STOP:
            return
        if has_shares:
            payload = {**payload, **_scatter(None)}
        try:
            _HANDLERS[op](payload)
        except BaseException:
            traceback.print_exc()
            abandon(1)


def shutdown() -> None:
    """Leave the group together: a rank that tears its connections down while another still
    talks to it makes gloo abort that other process."""
    if dist.is_available() and dist.is_initialized():
        if _OPEN_STEPS:  # out of step with the others: leave without waiting for them
            return
        gc.collect()  # DDP wrappers left in reference cycles hold the group: free them while it lives
        dist.barrier()
        dist.destroy_process_group()


def abandon(code: int) -> None:
    """End this process now, without the interpreter's teardown (see :func:`exit_process`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_process(code: int) -> None:
    """End a process that was in a group. Interpreter teardown after the group is gone sometimes
    aborts in gloo's threads (``terminate called without an active exception``), turning a
    finished command into a failure: flush and leave without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(code)
    abandon(code)
