"""A folder whose writes fail, for the tests of write failures: the tests may run as root, where chmod does
not stop a write, so `fail_writes` patches the calls that create files and folders instead (os.open, which
tempfile.mkstemp uses; builtins.open / io.open for writing; os.mkdir, which os.makedirs uses)."""

from __future__ import annotations

import builtins
import errno
import io
import os


def fail_writes(monkeypatch, root, code: int = errno.EROFS) -> None:
    """Every write under `root` (a file created or opened for writing, a folder made) fails with `code`
    (EROFS: read-only file system, ENOSPC: no space left on device, EACCES: permission denied)."""
    root = os.path.abspath(os.fspath(root))
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(path) -> bool:
        try:
            full = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return full == root or full.startswith(root + os.sep)

    def refuse(path):
        return OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if under(file) and any(c in mode for c in "wax+"):
            raise refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path):
            raise refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
