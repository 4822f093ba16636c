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

import torch

from ..models.checkpoint import read_file
from .config import ConfigTable, read_yaml
from .distributed import DistInfo, barrier, broadcast_object, session
from .errors import UserError, user_errors
from .files import make_dir, write_failure, write_yaml

__all__ = ["Run", "Interrupted", "open_run", "load_training_checkpoint", "checkpoint_task", "require_task", "note",
           "LAST", "CONFIG", "SUMMARY"]

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


#: the commands of each kind of run, as `require_task` names them
_TASK_COMMANDS = {"classification": "lbmamba train", "segmentation": "lbmamba seg train",
                  "detection": "lbmamba det train", "mil": "lbmamba mil train"}


_COMMAND_TASKS = {command[len("lbmamba "):]: task for task, command in _TASK_COMMANDS.items()}


def checkpoint_task(ckpt: Any) -> Optional[str]:
    """What kind of run wrote `ckpt` (what a checkpoint file held): "classification", "segmentation",
    "detection" or "mil", from the "task" our checkpoints record, else (earlier lbmamba files, the reference
    code bases' files) from their keys; None when nothing tells (e.g. not a dict of weights)."""
    if not isinstance(ckpt, Mapping):
        return None
    task = ckpt.get("task")
    if task in _TASK_COMMANDS:
        return str(task)
    if "model_config" in ckpt or ckpt.get("format") == "lbmamba-mil":
        return "mil"
    weights = ckpt
    for key in ("model", "state_dict", "module"):
        if isinstance(weights.get(key), Mapping):
            weights = weights[key]
            break
    names = [str(k) for k in weights.keys()]
    if not any(isinstance(v, torch.Tensor) for v in weights.values()):
        return None
    stripped = [n[len("module."):] if n.startswith("module.") else n for n in names]
    if any(n.startswith(("roi_heads.", "rpn.")) for n in stripped):
        return "detection"
    if any(n.startswith(("decode_head.", "auxiliary_head.")) for n in stripped):
        return "segmentation"
    if any(n.startswith(("attention_net.", "classifiers.", "instance_classifiers.")) for n in stripped):
        return "mil"  # CLAM's / ABMIL's layouts
    return "classification"


def require_task(ckpt: Any, path: str, want: str, command: str, init_flag: bool = True) -> None:
    """UserError, in one line, when `ckpt` (read from `path`) is of another kind of run than `want`:
    "checkpoint P is a classification checkpoint; `lbmamba seg eval` needs a segmentation checkpoint ..."."""
    have = checkpoint_task(ckpt)
    if have is None or have == want:
        return
    hint = ""
    if init_flag and have == "classification" and want in ("segmentation", "detection"):
        hint = f", or give it to `{_TASK_COMMANDS[want]} --init-checkpoint` for backbone weights"
    elif have == "mil":
        hint = f" (made by `{_TASK_COMMANDS[want]}`)"
    kind = "MIL" if have == "mil" else have
    if want == "mil":  # as `mil eval` has always said it
        raise UserError(f"checkpoint {path} is a {kind} checkpoint (as `{_TASK_COMMANDS[have]}` writes), not a "
                        f"`lbmamba mil train` fold checkpoint; `lbmamba {command}` needs one")
    raise UserError(f"checkpoint {path} is a {kind} checkpoint (as `{_TASK_COMMANDS[have]}` writes); "
                    f"`lbmamba {command}` needs a {want} checkpoint{hint}")


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


#: how long a lock whose process is dead may still be held (by its orphaned data-loader workers, which
#: notice their parent is gone within seconds) before a new run gives up waiting for it
LOCK_TAKEOVER_WAIT_S = 30.0


def _holder_pid(text: str) -> Optional[int]:
    """The process id in a lock's text ("process 123 on HOST (...)") when HOST is this machine."""
    parts = text.split()
    if len(parts) >= 4 and parts[0] == "process" and parts[1].isdigit() and parts[3] == socket.gethostname():
        return int(parts[1])
    return None


def _same_file(handle, path: str) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. permission denied: it exists
        return True
    return True


@contextlib.contextmanager
def _locked(folder: str, command: str) -> Iterator[None]:
    """Hold the folder's lock for the block (and remove `.lock` when it ends); UserError naming the holder
    when another live process has it. A lock whose process is dead (killed with SIGKILL) but is still held
    by its orphaned workers is waited for (up to LOCK_TAKEOVER_WAIT_S) and taken over, said in one line."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs in one folder are the user's to avoid
        yield
        return
    make_dir(folder)
    path = os.path.join(folder, LOCK)
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise write_failure(path, exc) from exc
    try:
        deadline, said = None, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(handle, path):
                    break
                handle.close()  # the run before us removed .lock as we opened it: lock the one there now
                try:
                    handle = open(path, "a+", encoding="utf-8")
                except OSError as exc:
                    raise write_failure(path, exc) from exc
                continue
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                pid = _holder_pid(holder)
                if pid is None or _alive(pid):
                    raise UserError(f"run folder {folder} is in use by {holder}; wait for it to end or choose "
                                    "another output") from None
                if deadline is None:
                    deadline = time.monotonic() + LOCK_TAKEOVER_WAIT_S
                if not said:
                    note(f"run folder {folder}: its lock was held by process {pid}, which is no longer running; "
                         "waiting for its data-loader workers to exit, then taking the folder over")
                    said = True
                if time.monotonic() > deadline:
                    raise UserError(f"run folder {folder} is still locked {LOCK_TAKEOVER_WAIT_S:.0f} s after its "
                                    f"process {pid} ended (leftover worker processes hold it); end them (`fuser "
                                    f"{path}` names them) or choose another output") from None
                time.sleep(0.25)
        if said:
            note(f"run folder {folder}: took over the lock of process {pid}")
        try:
            handle.seek(0)
            handle.truncate()
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"process {os.getpid()} on {socket.gethostname()} ({command}, since {since})")
            handle.flush()
        except OSError as exc:
            raise write_failure(path, exc) from exc
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # still ours: no other process can hold it now
                os.unlink(path)
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
            if table.command in _COMMAND_TASKS and checkpoint.get("task"):  # another task's run, named as such
                require_task(checkpoint, last, _COMMAND_TASKS[table.command], f"{table.command} --resume")
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
        existed = os.path.isdir(folder)
        try:
            with lock:
                found = set(os.listdir(folder)) if dist.is_main and not resume else None
                try:
                    if found is not None:
                        _claim(folder, bool(cfg.get("overwrite")))
                        write_yaml(os.path.join(folder, CONFIG), cfg)
                    barrier(dist)
                    try:
                        yield Run(cfg=cfg, dir=folder, dist=dist, checkpoint=checkpoint)
                    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: say where the run is and how to go on
                        if found is not None and not _saved_anything(folder):
                            raise
                        raise Interrupted(f"the run in {folder} is kept as of its last saved state; continue it with "
                                          f"`lbmamba {table.command} --resume {folder}`") from exc
                except BaseException:
                    if found is not None and not _saved_anything(folder):  # failed before its first checkpoint
                        _restore_folder(folder, found, existed)
                    raise
        except BaseException:
            if dist.is_main and not resume and not existed:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # made by this run, and empty again
            raise


def _saved_anything(folder: str) -> bool:
    """Whether a run wrote a checkpoint (`*.pth`, `*.pt`) into `folder`: from then on it can be resumed."""
    try:
        return any(name.endswith((".pth", ".pt")) and not name.startswith(".") for name in os.listdir(folder))
    except OSError:
        return True


def _restore_folder(folder: str, found: set, existed: bool) -> None:
    """Leave the folder of a new run that failed before its first checkpoint as it was found: what the run
    added (config.yaml, generated data, a record) removed, the folder too when the run made it."""
    import shutil

    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name in found or name == LOCK:
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def note(message: str) -> None:
    """One line for the user on stderr (the last stdout line is the command's JSON)."""
    print(message, file=sys.stderr, flush=True)
