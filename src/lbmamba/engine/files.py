"""Writing files so that a crash never leaves half of one: every file a run writes goes through here.

`atomic_path(path)` gives a temporary path beside `path` to write to, by any means (torch.save, h5py,
matplotlib, csv); when the block ends cleanly the data is fsync'ed and the file replaces `path` in one
step (os.replace, atomic on POSIX and Windows), so `path` is always either the old or the new complete
file. On an error the temporary file is removed and `path` is untouched.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

from .errors import UserError

__all__ = ["WriteError", "write_failure", "make_dir", "atomic_path",
            "atomic_save", "write_text", "write_json", "write_jsonl", "write_yaml", "write_csv",
           "write_h5", "jsonable"]


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems
        pass
    finally:
        os.close(fd)


class WriteError(UserError, OSError):
    """A file or folder could not be written (read-only file system, full disk, no permission, a file where
    a folder should be): one line naming the path and the cause. Also an OSError, for callers that catch those."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _free_bytes(path: str) -> Optional[int]:
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or ".").free
    except OSError:
        return None


def write_failure(path: str, exc: BaseException, what: str = "write") -> WriteError:
    """The one-line error of a failed write of `path`: the system's reason (read-only file system, no space
    left on device, permission denied, not a directory ...), or for a writer that hides it (torch.save's
    "unexpected pos", h5py) its first line and the space left on the disk."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError) and exc.strerror:
        cause = exc.strerror[0].lower() + exc.strerror[1:]
        where = exc.filename if exc.filename and os.fspath(exc.filename) != os.fspath(path) else None
        if where and not os.path.basename(os.fspath(where)).startswith("."):  # not our temporary file
            cause += f" ({where})"
    else:
        text = str(exc).strip()
        cause = text.splitlines()[0] if text else type(exc).__name__
        free = _free_bytes(path)
        if free is not None and free < 64 << 20:
            cause = f"the disk is full ({free / 2**20:.1f} MiB free; {cause})"
    return WriteError(f"cannot {what} {path}: {cause}")


def make_dir(path: str) -> str:
    """os.makedirs(path, exist_ok=True), or a WriteError naming the folder and the cause."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        if os.path.exists(path) and not os.path.isdir(path):
            raise WriteError(f"cannot create folder {path}: a file of that name is there") from exc
        raise write_failure(path, exc, "create folder") from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path in `path`'s folder (same extension, for writers that go by it) that replaces
    `path` when the block ends without an error. Any failure to write (read-only file system, full disk,
    no permission) raises a `WriteError` naming `path` and the cause; `path` keeps what it held before."""
    directory = os.path.dirname(os.path.abspath(path))
    make_dir(directory)
    stem, ext = os.path.splitext(os.path.basename(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise write_failure(path, exc) from exc
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, UserError):
            if isinstance(exc, RuntimeError) and not _write_like(exc):
                raise
            raise write_failure(path, exc) from exc
        raise
    _fsync(directory)  # make the rename itself durable


def _write_like(exc: RuntimeError) -> bool:
    """A RuntimeError of a writer that ran out of room (torch.save: "[enforce fail at inline_container.cc]
    unexpected pos", "PytorchStreamWriter failed writing file ..."), not a bug of the caller."""
    text = str(exc)
    return any(s in text for s in ("inline_container", "unexpected pos", "PytorchStreamWriter", "file write failed"))


def atomic_save(obj: Any, path: str) -> None:
    """torch.save(obj, path), atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line (the whole file rewritten: appending could leave half a line)."""
    write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in records))


def write_yaml(path: str, obj: Any) -> None:
    write_text(path, yaml.safe_dump(jsonable(obj), sort_keys=False))


def write_csv(path: str, rows: Iterable[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def write_h5(path: str, datasets: Mapping[str, Any], attrs: Optional[Mapping[str, Any]] = None) -> None:
    """An HDF5 file of named arrays (e.g. a CLAM feature file: `features`, `coords`) and file attributes."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
        for name, value in (attrs or {}).items():
            f.attrs[name] = value


def jsonable(value: Any) -> Any:
    """`value` as plain JSON / YAML / `weights_only` data: dicts with string keys, lists, str, int, float,
    bool, None; NaN and infinities become None, numpy and tensor values plain Python, anything else str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
