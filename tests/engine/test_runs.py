"""The shared run helpers: atomic files, RNG states, checkpoint reading, run folders and their lock."""

import json
import os
import random

import numpy as np
import pytest
import torch

from lbmamba.engine import ConfigTable, Key, UserError
from lbmamba.engine.errors import last_line, user_errors
from lbmamba.engine.files import atomic_save, jsonable, write_csv, write_h5, write_json, write_jsonl
from lbmamba.engine.rng import capture_rng_state, derive_seed, restore_rng_state
from lbmamba.engine.runs import load_training_checkpoint, open_run
from lbmamba.models.checkpoint import CheckpointReadError


def _files(folder):
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


# ------------------------------------------------------------------------------------------ files
def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    path = str(tmp_path / "last.pth")
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    write_json(str(tmp_path / "a.json"), {"x": float("nan"), "y": np.float32(2.5)})
    write_jsonl(str(tmp_path / "m.jsonl"), [{"epoch": 1}, {"epoch": 2}])
    write_csv(str(tmp_path / "s.csv"), [["a", "b"], [1, 2]])
    write_h5(str(tmp_path / "f.h5"), {"features": np.ones((2, 3), np.float32)}, {"encoder": "x"})
    assert os.listdir(tmp_path) and all(not f.startswith(".") for f in os.listdir(tmp_path))
    assert load_training_checkpoint(path)["epoch"] == 2
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": 2.5}
    assert (tmp_path / "m.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, path)
    assert load_training_checkpoint(path)["epoch"] == 2 and all(not f.startswith(".") for f in os.listdir(tmp_path))


def test_jsonable():
    value = {1: (np.int64(3), torch.tensor([1.5]), float("inf")), "s": {"n": None, "o": object}}
    out = jsonable(value)
    assert out["1"] == [3, [1.5], None] and out["s"]["n"] is None and isinstance(out["s"]["o"], str)
    json.dumps(out)


# ------------------------------------------------------------------------------------------ randomness
def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    atomic_save({"rng": state}, str(tmp_path / "c.pth"))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_training_checkpoint(str(tmp_path / "c.pth"))["rng"])
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_derived_seeds_differ_where_sums_would_collide():
    assert derive_seed(0, 1, 0) != derive_seed(0, 0, 1)
    assert derive_seed(1, 0) != derive_seed(0, 1000) and derive_seed(5, 2) == derive_seed(5, 2)
    assert 0 <= derive_seed(-1, 2**40) < 2**31


# ------------------------------------------------------------------------------------------ errors
def test_unreadable_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_training_checkpoint(str(bad))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_training_checkpoint(str(tmp_path / "missing.pth"))
    torch.save({"model": {"w": torch.ones(100)}}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint .*truncated.pth"):
        load_training_checkpoint(str(tmp_path / "truncated.pth"))


def test_lower_layers_input_errors_become_one_line_user_errors():
    with pytest.raises(UserError, match="^cannot read checkpoint x: it is broken$"):
        with user_errors():
            raise CheckpointReadError("cannot read checkpoint x:\n it is broken")
    with pytest.raises(KeyError):  # a bug stays a bug
        with user_errors():
            raise KeyError("x")


def test_worker_traceback_is_reduced_to_the_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\nlbmamba.data.images.DataError: 50 consecutive unreadable images\n")
    assert last_line(wrapped) == "50 consecutive unreadable images"
    assert last_line("plain message") == "plain message"


# ------------------------------------------------------------------------------------------ run folders
DEMO = ConfigTable("demo", {
    "lr": Key(0.1, "learning rate"),
    "output": Key(None, "run folder", kind="str", effect="none"),
    "overwrite": Key(False, "move an old run aside", effect="once"),
    "resume": Key(None, "resume this run", kind="str", effect="once"),
    "device": Key("cpu", "device", effect="none"),
    "threads": Key(None, "threads", kind="int", effect="none"),
})


def _start(**overrides):
    with open_run(DEMO, overrides, None, lambda cfg: "demo") as run:
        return run


def test_a_new_run_gets_its_folder_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _start()
    assert os.path.dirname(run.dir) == str(tmp_path / "runs") and run.dir.endswith("-demo")
    assert _files(run.dir) == ["config.yaml"] and run.cfg["output"] == run.dir and not run.resumed
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        _start(output=str(tmp_path / "a_file"))


def test_a_folder_holding_a_run_is_never_reused_silently(tmp_path):
    out = tmp_path / "run"
    _start(output=str(out), lr=0.5)
    (out / "best.pth").write_text("the earlier run's best weights")
    with pytest.raises(UserError, match="already holds a run; resume it .*overwrite"):
        _start(output=str(out))
    assert (out / "best.pth").read_text() == "the earlier run's best weights"
    run = _start(output=str(out), overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "best.pth").read_text() == "the earlier run's best weights"
    assert _files(run.dir) == ["config.yaml"]


def test_resume_takes_the_folder_and_its_config(tmp_path):
    out = tmp_path / "run"
    _start(output=str(out), lr=0.5)
    run = _start(resume=str(out))
    assert run.resumed and run.cfg["lr"] == 0.5 and run.checkpoint is None and run.dir == str(out)
    atomic_save({"config": dict(run.cfg, lr=0.5), "epoch": 3}, str(out / "last.pth"))
    run = _start(resume=str(out / "last.pth"), threads=2)
    assert run.checkpoint["epoch"] == 3 and run.cfg["threads"] == 2
    with pytest.raises(UserError, match="another config \\(lr: run 0.5 vs now 0.1\\)"):
        _start(resume=str(out), lr=0.1)
    (out / "best.pth").write_text("x")
    with pytest.raises(UserError, match="resume takes a run folder or its last.pth"):
        _start(resume=str(out / "best.pth"))
    with pytest.raises(UserError, match="stays in its own folder"):
        _start(resume=str(out), output=str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="no run there"):
        _start(resume=str(tmp_path / "nothing"))


def _hold_the_lock(out, ready, release):
    table = ConfigTable("demo", {"output": Key(None, "", kind="str"), "resume": Key(None, "", kind="str")})
    with open_run(table, {"output": str(out)}, None, lambda cfg: "demo"):
        ready.set()
        release.wait(60)


def test_a_second_run_in_a_locked_folder_fails_naming_the_holder(tmp_path):
    """A process holds the folder's lock while it works; another start there fails at once. (The holder is a fork
    of this process: a fresh interpreter would spend seconds importing torch.)"""
    import multiprocessing

    out = tmp_path / "run"
    fork = multiprocessing.get_context("fork")
    ready, release = fork.Event(), fork.Event()
    holder = fork.Process(target=_hold_the_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on .*demo"):
            _start(output=str(out), overwrite=True)
        with pytest.raises(UserError, match="in use by process"):
            _start(resume=str(out))
    finally:
        holder.kill()
        holder.join()
    assert _start(resume=str(out)).resumed  # released when its holder ends, however it ends
