"""Which device a command runs on, and how many CPU threads it uses."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .config import Key
from .errors import UserError

__all__ = ["resolve_device", "set_cpu_threads", "cpu_threads", "threads_key", "demo_threads", "autocast",
           "grad_scaler", "AMP_MODES"]

#: mixed-precision settings every training command takes (null: fp32)
AMP_MODES = ("bf16", "fp16")


def resolve_device(name: Optional[str] = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> the LOCAL_RANK-th GPU when CUDA is available, else the CPU; 'cuda' -> cuda:LOCAL_RANK;
    'cpu', 'cuda:N', 'mps' as they are. Makes a CUDA device the current one."""
    text = (name or "auto").lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        text = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available (use device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return device


def threads_key() -> Key:
    """The `threads` key every command has."""
    return Key(None, "CPU threads per process; null: 1 for the bundled demos (digits, digits-bags), else torch's "
                     "default (under torchrun on the CPU: cores / local processes)", kind="int", positive=True,
               flag=True, effect="none")


def demo_threads(threads: Optional[int], demo: bool) -> Optional[int]:
    """`threads` as given, or for null: 1 on the bundled demos. Their models are tiny: one thread ran them as
    fast as two on an idle 2-core machine and faster on a busy one (benchmarks/RESULTS.md); real data
    keeps torch's default."""
    return threads or (1 if demo else None)


def set_cpu_threads(threads: int) -> None:
    """Threads for torch's CPU kernels and for numba's parallel regions (the cpu scan backend follows
    torch's count on every call)."""
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):  # numba missing, or its pool smaller than asked: torch's setting stands
        pass


@contextlib.contextmanager
def cpu_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with `threads` CPU threads (None: as they are), and restore the count after it."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    set_cpu_threads(threads)
    try:
        yield
    finally:
        set_cpu_threads(before)


def autocast(device: torch.device, amp: Optional[str]):
    """torch.autocast to bf16 / fp16 on `device`, or nothing for amp=None (fp32)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device: torch.device, amp: Optional[str]) -> "torch.amp.GradScaler":
    """A loss scaler, enabled for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
