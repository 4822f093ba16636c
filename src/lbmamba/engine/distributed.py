"""The process a command runs in: torchrun / DistributedDataParallel plumbing, device and threads.

`torchrun --nproc_per_node N -m lbmamba train ...` sets RANK, WORLD_SIZE, LOCAL_RANK (and
MASTER_ADDR / MASTER_PORT); without them everything runs as a single process. The backend is nccl when
the process drives a GPU, gloo on the CPU. Rank 0 writes the run's files.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from .device import ThreadFollower, cpu_threads, default_threads, resolve_device, threads_warning
from .errors import UserError

__all__ = ["DistInfo", "session", "all_reduce_sum", "broadcast_object", "barrier", "gather_objects"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    #: threads: null on the CPU in a single process: the rule that keeps following the machine's load
    follower: Optional[ThreadFollower] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from exc


@contextlib.contextmanager
def session(device: Optional[str] = "auto", threads: Optional[int] = None, command: str = "",
            distributed: bool = True) -> Iterator[DistInfo]:
    """The process's place in a torchrun job, its device and CPU threads, for the length of a command.

    Joins the process group when WORLD_SIZE > 1 (and leaves it after), uses `threads` CPU threads (on the
    CPU with neither `threads` nor OMP_NUM_THREADS set: `default_threads`) and restores the thread count
    after. `distributed=False`: a command that runs in one process only.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1 and not distributed:
        raise UserError(f"lbmamba {command} runs in one process; start it without torchrun")
    info = DistInfo(_env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0),
                    _env_int("LOCAL_WORLD_SIZE", world_size))
    info.device = resolve_device(device, info.local_rank)
    if not threads and info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = default_threads(max(info.local_world_size, 1))
        if max(info.local_world_size, 1) == 1:
            info.follower = ThreadFollower(threads, announce=lambda line: print(line, file=sys.stderr, flush=True))
    elif threads and info.device.type == "cpu" and max(info.local_world_size, 1) == 1 and info.rank == 0:
        warning = threads_warning(int(threads))  # an explicit count above the idle cores: say what it costs
        if warning:
            print(warning, file=sys.stderr, flush=True)
    joined = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        kwargs = {"device_id": info.device} if info.device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        joined = True
    try:
        with cpu_threads(threads):
            yield info
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks in place (no-op for a single process); returns the tensor."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] for a single process)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
