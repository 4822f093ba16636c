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
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml

__all__ = ["atomic_path", "atomic_save", "write_text", "write_json", "write_jsonl", "write_yaml", "write_csv",
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


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path in `path`'s folder (same extension, for writers that go by it) that replaces
    `path` when the block ends without an error."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(directory)  # make the rename itself durable


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
