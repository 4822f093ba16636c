"""Run folders: where a training run lives, how it starts, and how it resumes. No run is ever lost.

A run folder holds `config.yaml` (the run's whole config, written before anything else), `last.pth`
(the state to resume from, written atomically after every epoch) and what the task adds (`best.pth`,
`metrics.jsonl`, `curves.png`, `summary.json`, ...).

* A new run gets `runs/<time>-<name>` unless the config's `output` names a folder. A folder that
  already holds a run is never written by a new one: resume it, choose another folder, or set
  `overwrite=true`, which moves the old run aside to `<folder>.old-<time>` first.
* While a run works in its folder it holds a lock there (`.lock`, an flock on POSIX systems); a
  second run in the same folder fails at once, naming the process that holds it.
* `resume=<folder>` (or `<folder>/last.pth`) continues the run with its own config (see
  `ConfigTable.resume`: only keys that do not change the result may differ).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

from ..models.checkpoint import read_file
from .config import ConfigTable, read_yaml
from .distributed import DistInfo, barrier, broadcast_object, session
from .errors import UserError, user_errors
from .files import write_yaml

__all__ = ["Run", "Interrupted", "open_run", "load_training_checkpoint", "note", "LAST", "CONFIG", "SUMMARY"]

LAST, CONFIG, SUMMARY, LOCK = "last.pth", "config.yaml", "summary.json", ".lock"
#: files whose presence means a folder holds a run
_RUN_MARKERS = (CONFIG, LAST, "best.pth", "metrics.jsonl", SUMMARY, "summary.csv")


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; the message says where it is kept and how to resume it."""


@dataclass
class Run:
    """A run being trained: its config, folder, process, and (when resumed) the contents of its last.pth."""

    cfg: Dict[str, Any]
    dir: str
    dist: DistInfo
    checkpoint: Optional[Dict[str, Any]] = None

    @property
    def resumed(self) -> bool:
        return bool(self.cfg.get("resume"))

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def saved_summary(self) -> Optional[Dict[str, Any]]:
        """summary.json of a run that finished, or None."""
        try:
            with open(self.path(SUMMARY), "r", encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None


@user_errors()
def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint dict, read with `torch.load(weights_only=True)` onto the CPU; UserError if it cannot be."""
    ckpt = read_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} is not a dict (got {type(ckpt).__name__})")
    return ckpt


def _holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, m)) for m in _RUN_MARKERS)


def _new_run_dir(output: Optional[str], name: str) -> str:
    if not output:
        return os.path.abspath(os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"))
    out = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output {out} is a file, not a folder; choose a folder for the run")
    return out


def _claim(folder: str, overwrite: bool) -> None:
    """Make `folder` (locked by us) free for a new run: refuse one that holds a run, or move it aside."""
    if not _holds_run(folder):
        return
    if not overwrite:
        raise UserError(
            f"output {folder} already holds a run; resume it (--resume {folder}), choose another output, "
            "or set overwrite=true to move the old run aside"
        )
    aside = f"{folder}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(aside)
    for entry in os.listdir(folder):
        if entry != LOCK:
            os.replace(os.path.join(folder, entry), os.path.join(aside, entry))
    note(f"moved the earlier run in {folder} to {aside}")


def _resume_target(resume: str) -> tuple:
    """(run folder, its last.pth) from `resume` = a run folder or its last.pth."""
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.basename(path) == LAST:
        folder = os.path.dirname(path)
    elif os.path.isdir(path) or not os.path.exists(path):
        folder = path
    else:
        raise UserError(
            f"cannot resume from {path}: resume takes a run folder or its {LAST} (the latest state); "
            f"{os.path.basename(path)} is not it. To start a new run from these weights set init_checkpoint instead"
        )
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, CONFIG)):
        raise UserError(f"cannot resume from {resume}: no run there (no {CONFIG} in {folder})")
    return folder, os.path.join(folder, LAST)


@contextlib.contextmanager
def _locked(folder: str, command: str) -> Iterator[None]:
    """Hold the folder's lock for the block; UserError naming the holder when another process has it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs in one folder are the user's to avoid
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"run folder {folder} is in use by {holder}; wait for it to end or choose another "
                            "output") from None
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} ({command}, since {since})")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


@contextlib.contextmanager
def open_run(table: ConfigTable, overrides: Optional[Mapping[str, Any]], config_path: Optional[str],
             name: Callable[[Dict[str, Any]], str],
             prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
             distributed: bool = True) -> Iterator[Run]:
    """Start or resume a run of `table`'s command: its config, its process (`session`), its folder, and
    the folder's lock for as long as the block runs.

    A new run: config = defaults <- `config_path` <- `overrides`, then the folder (`name(cfg)` names the
    default one) and its config.yaml. A resumed run (`resume` set): the folder's own config, with the given
    keys checked by `table.resume`, and the contents of its last.pth when there is one (none yet: the run
    starts over in its folder). Both then go through `prepare(cfg)`, what the task checks and decides
    before anything is written (e.g. the data's classes; it leaves set keys as they are). The config's
    `output` is the run folder in both cases.
    `distributed=False`: a task that runs in one process only.
    """
    given = dict(table.given(config_path, overrides))
    resume = given.pop("resume", None)
    checkpoint = None
    if resume:
        folder, last = _resume_target(str(resume))
        output = given.pop("output", None)
        if output and os.path.abspath(os.path.expanduser(output)) != folder:
            raise UserError(f"a resumed run stays in its own folder {folder}; drop output={output}")
        if os.path.isfile(last):
            checkpoint = load_training_checkpoint(last)
            saved = checkpoint.get("config")
            if not isinstance(saved, Mapping):
                raise UserError(f"cannot resume from {last}: it is not an lbmamba training checkpoint (no config "
                                "inside)")
        else:
            saved = read_yaml(os.path.join(folder, CONFIG))
        cfg = table.resume(saved, given, source=f"from {folder}", allow_change=bool(given.get("allow_config_change")))
        cfg["resume"] = folder
    else:
        cfg = table.validate(table.apply(table.defaults(), given))
    if prepare is not None:  # a resumed run too: its data is checked again, keys a later version added are filled
        cfg = prepare(cfg)
    with session(cfg.get("device"), cfg.get("threads"), table.command, distributed) as dist:
        if not resume:
            folder = broadcast_object(_new_run_dir(cfg.get("output"), name(cfg)) if dist.is_main else None, dist)
        cfg["output"] = folder
        lock = _locked(folder, f"lbmamba {table.command}") if dist.is_main else contextlib.nullcontext()
        with lock:
            if dist.is_main and not resume:
                _claim(folder, bool(cfg.get("overwrite")))
                write_yaml(os.path.join(folder, CONFIG), cfg)
            barrier(dist)
            try:
                yield Run(cfg=cfg, dir=folder, dist=dist, checkpoint=checkpoint)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: say where the run is and how to go on
                raise Interrupted(f"the run in {folder} is kept as of its last saved state; continue it with "
                                  f"`lbmamba {table.command} --resume {folder}`") from exc


def note(message: str) -> None:
    """One line for the user on stderr (the last stdout line is the command's JSON)."""
    print(message, file=sys.stderr, flush=True)
