"""torchrun / DistributedDataParallel plumbing: one process per device, rank 0 writes.

`torchrun --nproc_per_node N -m lbmamba train ...` sets RANK, WORLD_SIZE, LOCAL_RANK (and
MASTER_ADDR / MASTER_PORT); without them everything runs as a single process. The backend is nccl when
the process drives a GPU, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .errors import UserError

__all__ = ["DistInfo", "init_distributed", "set_cpu_threads", "cleanup_distributed", "resolve_device", "all_reduce_sum", "broadcast_object",
           "barrier", "all_gather_object"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the LOCAL_RANK-th GPU when CUDA is available, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available (use device=cpu)")
        if name == "cuda":
            name = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc


def set_cpu_threads(threads: int) -> None:
    """Threads for torch's CPU kernels and for the numba scan kernels (lbmamba.ops cpu backend)."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba missing or its thread pool fixed: torch's setting still applies
        pass


def init_distributed(device: str = "auto", threads: Optional[int] = None) -> DistInfo:
    """Read the torchrun environment, pick the device and (if WORLD_SIZE > 1) join the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    dev = resolve_device(device, local_rank)
    if not threads and world_size > 1 and dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    if threads:
        set_cpu_threads(threads)
    info = DistInfo(rank, world_size, local_rank, local_world_size, dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, **kwargs)
        except TypeError:  # older torch without device_id
            dist.init_process_group(backend=backend)
        info.initialized_here = True
    return info


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
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


def all_gather_object(obj: Any, info: DistInfo) -> List[Any]:
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
