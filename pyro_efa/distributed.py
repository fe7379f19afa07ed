"""Data-parallel training with :mod:`torch.distributed` (launched by ``torchrun``).

One process per CPU worker or GPU; every process holds the whole (training) data set and the same
model, :func:`pyro_efa.fit` wraps the ELBO module (model and guide) in
:class:`~torch.nn.parallel.DistributedDataParallel` and gives each process its share of every
*global* batch. Command line::

    torchrun --nproc_per_node 4 -m pyro_efa fit data.csv --unit user --key movie --value rating \\
        --batch-size 16 --out fit/

trains with global batches of ``4 x 16 = 64`` units and writes ``fit/`` from rank 0 only. In
Python, call :func:`init_from_env` once at the start of the script and run :func:`pyro_efa.fit`
as usual in every process; save files only where :func:`is_main` is true.

**What one step computes.** All processes draw the same shuffled order of units (the batch
generator is seeded identically), cut it into global batches of ``batch_size * world_size``
units, and process ``r`` takes units ``r, r + W, r + 2W, ...`` of each global batch (a
distributed sampler by unit; the strided split gives every process units of similar length
after length bucketing). Each process scores its units with the unit plate scaled to the global
batch (``N / B_global`` per unit, times ``W`` because DDP *averages* gradients), so the averaged
gradient equals the gradient of a one-process run with batch ``batch_size * world_size``, priors
included, also for a last, uneven batch. With a MAP (:class:`~pyro.infer.autoguide.AutoDelta`)
guide nothing is sampled, and a ``W``-process run follows the one-process run up to
floating-point summation order (tested: see ``tests/test_distributed.py``). Sampling guides use
a different Pyro seed per process, so their noise is independent across processes.

**Backends.** ``gloo`` on CPU (one torch thread per process unless ``OMP_NUM_THREADS`` says
otherwise), ``nccl`` with CUDA (process ``r`` uses GPU ``LOCAL_RANK``). On a machine with few
cores several CPU processes are slower than one; the point of the CPU path is correctness
checks and multi-socket hosts.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from .errors import InputError

__all__ = [
    "UnitScale",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "describe",
    "device",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "shard",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a :mod:`torch.distributed` process group is initialised with several processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK`` set by ``torchrun``; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files and shows progress (rank 0, or no process group)."""
    return rank() == 0


def device() -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by ``torchrun``'s environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    them (a plain ``python`` run), or with ``WORLD_SIZE=1``, it does nothing and returns False.

    :param str backend: ``"gloo"`` or ``"nccl"``; by default NCCL when CUDA is available, else gloo.
    :param float timeout_s: how long collective operations may wait for a slow process.
    :returns: whether this process is part of a multi-process group.
    :raises ValueError: for inconsistent environment variables or an unusable backend.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return False
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        this = int(os.environ.get("RANK", "0"))
    except ValueError as e:
        raise InputError(f"RANK and WORLD_SIZE must be integers ({e})") from e
    if size < 1 or not 0 <= this < size:
        raise InputError(f"bad process group: RANK={this}, WORLD_SIZE={size}")
    if size == 1:
        return False
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise InputError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
        torch.cuda.set_device(local_rank())
    elif backend != "gloo":
        raise InputError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    # one torch thread per process on CPU unless the user asked for more (torchrun sets
    # OMP_NUM_THREADS=1 itself when it starts several processes per node)
    if backend == "gloo":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup(wait: bool = True) -> None:
    """Leave the process group (no-op without one).

    :param bool wait: first wait for every process (a barrier), so that no process tears down
        its connections while another still uses them (with gloo that can abort the other
        process at exit). Pass ``False`` when leaving after an error, where the others may
        never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over processes, in place, and return it (unchanged without a group)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` in every process (a picklable object between our own
    processes; never used on data read from files)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` in every process (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(global_batch: int, this_rank: int, size: int) -> tuple[torch.Tensor, float]:
    """This process's positions within a global batch of ``global_batch`` units, and the factor
    that scales its unit plate to the global batch.

    Process ``r`` takes positions ``r, r + W, ...``. Its plate already scales each unit by
    ``N / B_r``; multiplying by ``W * B_r / B_global`` makes it ``W * N / B_global``, so the DDP
    average over processes is the one-process gradient of the global batch. A process left
    without units (a last global batch smaller than ``W``) gets the first unit with factor 0:
    it still contributes the prior terms and takes part in the gradient reduction.
    """
    if this_rank >= global_batch:
        return torch.zeros(1, dtype=torch.long), 0.0
    idx = torch.arange(this_rank, global_batch, size)
    return idx, size * len(idx) / global_batch


class UnitScale(Messenger):
    """Multiplies the scale of every site inside the unit plate ``name`` by ``factor``. Used to
    make a process's share of a global batch count as ``W / B_global`` per unit (see
    :func:`pyro_efa.distributed.shard`). A factor 0 keeps the sites in the autograd graph (zero
    gradients), which DDP needs: every process must produce a gradient for every parameter."""

    def __init__(self, name: str, factor: float) -> None:
        super().__init__()
        self.name = name
        self.factor = factor

    def _process_message(self, msg: Any) -> None:
        if any(frame.name == self.name for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def describe() -> str:
    """``"rank r of W (backend)"`` or ``"single process"``."""
    if not (dist.is_available() and dist.is_initialized()):
        return "single process"
    return f"rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()})"
