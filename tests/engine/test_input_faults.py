"""Bad input and faults handled in one line or read right: failed writes, run folders and their locks,
checkpoints of the wrong kind, class names against the checkpoint's, the threads warning."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from faults import fail_writes
from lbmamba.engine import UserError
from lbmamba.engine import runs as runs_module
from lbmamba.engine.config import ConfigTable, Key
from lbmamba.engine.dense import model_for
from lbmamba.engine.device import threads_warning
from lbmamba.engine.files import WriteError, atomic_save, write_text
from lbmamba.engine.runs import checkpoint_task, load_training_checkpoint, open_run, require_task


# ------------------------------------------------------------------------------------------ failed writes
@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"),
                                         (errno.ENOSPC, "no space left on device"),
                                         (errno.EACCES, "permission denied")])
def test_a_failed_write_is_one_line_and_the_old_file_stays_whole(tmp_path, monkeypatch, code, cause):
    path = tmp_path / "last.pth"
    atomic_save({"step": torch.tensor(1)}, str(path))
    fail_writes(monkeypatch, tmp_path, code)
    with pytest.raises(WriteError) as info:
        atomic_save({"step": torch.tensor(2)}, str(path))
    assert str(info.value) == f"cannot write {path}: {cause}"
    assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert load_training_checkpoint(str(path))["step"].item() == 1
    assert os.listdir(tmp_path) == ["last.pth"]  # no temporary file left


def test_a_full_disk_during_torch_save_is_named_and_the_old_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "best.pth"
    atomic_save({"step": torch.tensor(1)}, str(path))

    def full(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills mid-write
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 192 vs 128")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(WriteError, match=r"^cannot write .*best\.pth: the disk is full \(0\.0 MiB free; "
                                         r"\[enforce fail"):
        atomic_save({"step": torch.tensor(2)}, str(path))
    monkeypatch.undo()
    assert load_training_checkpoint(str(path))["step"].item() == 1 and os.listdir(tmp_path) == ["best.pth"]


def test_a_real_full_disk_keeps_the_old_checkpoint(tmp_path):
    """The same on a 3 MB tmpfs, where the machine allows mounting one (root on Linux)."""
    disk = tmp_path / "small"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        atomic_save({"w": torch.ones(10)}, str(disk / "last.pth"))
        with pytest.raises(WriteError, match=r"^cannot write .*last\.pth: the disk is full \(.* MiB free; "):
            atomic_save({"w": torch.ones(2_000_000)}, str(disk / "last.pth"))  # 8 MB
        with pytest.raises(WriteError, match=r"^cannot write .*big\.txt: no space left on device$"):
            write_text(str(disk / "big.txt"), "x" * 4_000_000)
        assert os.listdir(disk) == ["last.pth"] and load_training_checkpoint(str(disk / "last.pth"))["w"].numel() == 10
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(WriteError, match=r"cannot create folder .*out: a file of that name is there"):
        write_text(str(tmp_path / "out" / "summary.json"), "{}")


# ------------------------------------------------------------------------------------------ run folders
DEMO = ConfigTable("demo", {
    "output": Key(None, "run folder", kind="str", effect="none"),
    "overwrite": Key(False, "move an old run aside", effect="once"),
    "resume": Key(None, "resume this run", kind="str", effect="once"),
    "device": Key("cpu", "device", effect="none"),
    "threads": Key(None, "threads", kind="int", effect="none"),
})


def test_a_run_failing_before_its_first_checkpoint_leaves_the_folder_as_found(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(UserError, match="bad data"):
        with open_run(DEMO, {"output": str(new)}, None, lambda cfg: "demo"):
            assert (new / "config.yaml").is_file() and (new / ".lock").is_file()
            (new / "data").mkdir()  # e.g. a generated data set
            raise UserError("bad data")
    assert not new.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(UserError):
        with open_run(DEMO, {"output": str(mine)}, None, lambda cfg: "demo"):
            raise UserError("bad data")
    assert sorted(os.listdir(mine)) == ["notes.txt"]
    with open_run(DEMO, {"output": str(mine)}, None, lambda cfg: "demo"):  # a new run may take it
        pass
    assert sorted(os.listdir(mine)) == ["config.yaml", "notes.txt"]  # the lock is gone at the end


def test_a_run_that_saved_a_checkpoint_is_kept_when_it_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError):
        with open_run(DEMO, {"output": str(out)}, None, lambda cfg: "demo") as run:
            atomic_save({"x": torch.zeros(1)}, run.path("last.pth"))
            raise UserError("diverged")
    assert sorted(os.listdir(out)) == ["config.yaml", "last.pth"]


def test_a_lock_of_a_dead_process_is_taken_over_after_its_workers_exit(tmp_path, monkeypatch, capsys):
    """A run killed with SIGKILL leaves its lock held by orphaned loader workers for a few seconds: the
    next run waits for them and takes the folder over, said in one line."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = out / ".lock"
    lock.write_text(f"process {dead.pid} on {socket.gethostname()} (lbmamba det train, since now)")
    worker = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(lock)!r}, 'a+')\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(1.0)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "held"
        start = time.monotonic()
        with open_run(DEMO, {"output": str(out), "overwrite": True}, None, lambda cfg: "demo"):
            assert str(os.getpid()) in lock.read_text()
        assert time.monotonic() - start < runs_module.LOCK_TAKEOVER_WAIT_S
    finally:
        worker.wait()
    err = capsys.readouterr().err
    assert f"its lock was held by process {dead.pid}, which is no longer running" in err
    assert f"took over the lock of process {dead.pid}" in err


def test_a_live_holder_is_still_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"process {os.getpid()} on {socket.gethostname()} (x)")
    import fcntl

    with open(out / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"is in use by process {os.getpid()}"):
            with open_run(DEMO, {"output": str(out)}, None, lambda cfg: "demo"):
                pass


def test_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    fail_writes(monkeypatch, out)
    with pytest.raises(WriteError, match=rf"^cannot write {out}/\.lock: read-only file system$"):
        with open_run(DEMO, {"output": str(out)}, None, lambda cfg: "demo"):
            pass


# ------------------------------------------------------------------------------------------ checkpoint kinds
def _sd(*names):
    return {n: torch.zeros(1) for n in names}


@pytest.mark.parametrize("ckpt, task", [
    ({"format": "lbmamba-run", "task": "detection", "model": _sd("x")}, "detection"),
    ({"model": _sd("patch_embed.proj.weight", "head.weight")}, "classification"),
    ({"state_dict": _sd("backbone.x", "decode_head.conv_seg.weight")}, "segmentation"),
    ({"format": "lbmamba-run", "model": _sd("backbone.body.x", "roi_heads.box_head.0.weight")}, "detection"),
    ({"format": "lbmamba-run", "model": _sd("fc.weight"), "model_config": {}}, "mil"),
    ({"format": "lbmamba-mil", "model": _sd("fc.weight"), "config": {}}, "mil"),
    ({"format": "lbmamba-run", "config": {}, "finished": []}, None),
])
def test_the_kind_of_a_checkpoint_is_read_from_its_task_or_its_keys(ckpt, task):
    assert checkpoint_task(ckpt) == task


def test_the_wrong_kind_of_checkpoint_is_named():
    ckpt = {"model": _sd("patch_embed.proj.weight", "head.weight")}
    with pytest.raises(UserError) as info:
        require_task(ckpt, "c.pth", "segmentation", "seg eval")
    assert str(info.value) == ("checkpoint c.pth is a classification checkpoint (as `lbmamba train` writes); "
                               "`lbmamba seg eval` needs a segmentation checkpoint, or give it to `lbmamba seg train "
                               "--init-checkpoint` for backbone weights")
    with pytest.raises(UserError, match=r"is a MIL checkpoint .*`lbmamba det predict` needs a detection checkpoint"):
        require_task({"model": _sd("x"), "model_config": {}}, "f.pt", "detection", "det predict")
    require_task(ckpt, "c.pth", "classification", "eval")  # the right kind: nothing said


def test_a_new_checkpoint_records_its_task(tmp_path):
    from lbmamba.engine.loop import Task

    assert Task.task_name == "" and {c.task_name for c in _tasks()} == {"classification", "segmentation",
                                                                         "detection", "mil"}


def _tasks():
    from lbmamba.engine.classification import ClassificationTask
    from lbmamba.engine.detection import DetectionTask
    from lbmamba.engine.mil import FoldTask
    from lbmamba.engine.segmentation import SegmentationTask

    return [ClassificationTask, SegmentationTask, DetectionTask, FoldTask]


# ------------------------------------------------------------------------------------------ class names
def _model_for(cfg, ckpt, names):
    return model_for(dict(cfg), ckpt, names, torch.device("cpu"), lambda n: nn.Linear(2, n), lambda m: None,
                     False, "segmentor")


def test_class_names_that_differ_from_the_checkpoints_are_an_error_naming_both_lists():
    ckpt = {"num_classes": 3, "class_names": ["background", "cat", "dog"]}
    with pytest.raises(UserError) as info:
        _model_for({}, ckpt, ["background", "cat", "dog", "bird"])
    assert str(info.value) == ("the class names of the data differ from the checkpoint's: [background, cat, dog, "
                               "bird] (4) against [background, cat, dog] (3); evaluate on data of the checkpoint's "
                               "classes, or set --allow-class-mismatch to go on with the checkpoint's")
    with pytest.raises(UserError, match=r"class names of class_names differ .*\[a, b, c\] \(3\) against"):
        _model_for({"class_names": ["a", "b", "c"]}, ckpt, None)
    model, names = _model_for({"allow_class_mismatch": True}, ckpt, ["background", "cat", "dog", "bird"])
    assert names == ["background", "cat", "dog"] and model.out_features == 3
    assert _model_for({}, ckpt, ["background", "cat", "dog"])[1] == ["background", "cat", "dog"]


def test_predict_without_a_checkpoint_is_an_error_unless_random_weights(capsys):
    with pytest.raises(UserError, match=r"^no checkpoint given: set --checkpoint \(the best\.pth of a `lbmamba seg "
                                        r"train` run\); --random-weights runs an untrained model$"):
        _model_for({"random_weights": False, "num_classes": 3}, None, None)
    model, names = _model_for({"random_weights": True, "num_classes": 3}, None, None)
    assert names == ["0", "1", "2"] and "random weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ threads
def test_explicit_threads_above_the_idle_cores_are_said_with_their_cost():
    line = threads_warning(2, idle=0.9)
    assert line.startswith("warning: threads 2, but only 1 of this machine's ") and "many times slower" in line
    assert line.endswith("leave threads unset or use 1")
    assert threads_warning(2, idle=1.9) is None and threads_warning(1, idle=0.0) is None


def test_the_session_prints_the_threads_warning(monkeypatch, capsys):
    from lbmamba.engine import device
    from lbmamba.engine.distributed import session

    monkeypatch.setattr(device, "idle_cores", lambda sample_s=0.2: 0.4)
    with session("cpu", 3, "demo"):
        assert torch.get_num_threads() == 3
    assert "warning: threads 3, but only 1 of" in capsys.readouterr().err


def test_init_and_encoder_checkpoints_of_another_task_are_named(tmp_path):
    from lbmamba.engine.dense import load_dense_weights
    from lbmamba.engine.features import build_encoder

    mil = tmp_path / "fold_0.pt"
    torch.save({"format": "lbmamba-run", "task": "mil", "model": _sd("fc.weight"), "model_config": {}}, mil)
    det = tmp_path / "det.pth"
    torch.save({"format": "lbmamba-run", "model": _sd("backbone.x", "roi_heads.box.weight")}, det)

    def never(model, source):
        raise AssertionError("the wrong checkpoint was loaded")

    with pytest.raises(UserError) as info:
        load_dense_weights(nn.Linear(1, 1), str(mil), "init_checkpoint", never, "segmentor", "heads", "seg train",
                           whole_only=False)
    assert str(info.value) == (f"checkpoint {mil} is a MIL checkpoint (as `lbmamba mil train` writes); `lbmamba seg "
                               "train --init-checkpoint` needs a classification checkpoint (made by `lbmamba train`)")
    with pytest.raises(UserError, match=r"is a detection checkpoint .*`lbmamba mil extract --encoder-checkpoint` "
                                        r"needs a classification checkpoint$"):
        build_encoder("resnet18", str(det))


def test_the_bad_sample_count_of_a_training_run_says_it_counts_what_was_drawn():
    from lbmamba.engine.loaders import too_many_bad_samples

    error = too_many_bad_samples(2, 16, {"max_bad_images": 0, "max_bad_fraction": 0.1}, "images", "in training",
                                 so_far=True)
    assert str(error) == ("too many unreadable images in training: 2 of 16 drawn so far; the data-loader workers read "
                          "ahead, so warnings may name more files (more than max_bad_images 0 and max_bad_fraction "
                          "0.1); fix or remove them, or raise max_bad_fraction")
