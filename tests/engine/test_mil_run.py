"""`train_mil` / `evaluate_mil`: the digits-bags run, its run folder, exact resume, and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import write_bag, write_labels
from lbmamba.engine import UserError
from lbmamba.engine.mil import evaluate_mil, train_mil, write_digits_bags, write_split_file

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


# ---------------------------------------------------------------------- the digits-bags run
@pytest.mark.slow  # a minute: the short end-to-end run of the default set is the demo test below
def test_digits_bags_reach_auc(tmp_path):
    """The shipped digits-bags data set (5 parts of 80 bags) and model, two folds on a short schedule."""
    paths = write_digits_bags(str(tmp_path / "digits"), seed=0)
    assert os.path.isdir(tmp_path / "digits" / "h5_files")
    run = tmp_path / "run"
    summary = train_mil(dict(features=paths["features"], labels=paths["labels"], splits=paths["splits"],
                             fold_indices=[0, 1], model="lb", depth=2, embed_dim=64, drop_rate=0.25, lr=5e-4, epochs=6,
                             patience=2, stop_epoch=1, output=str(run), progress=False, device="cpu"))
    assert summary["folds"] == 2 and summary["classes"] == ["negative", "positive"]
    assert summary["auc_mean"] >= 0.9, summary
    files = sorted(f for f in os.listdir(run) if not f.startswith("."))
    assert files == ["config.yaml", "curves.png", "fold_0.pt", "fold_1.pt", "last.pth", "metrics.csv", "metrics.jsonl",
                     "summary.csv", "summary.json"]
    rows = list(csv.reader(open(run / "summary.csv")))
    assert [r[0] for r in rows[1:]] == ["0", "1", "mean", "std", "mean±std"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["fold"] for r in records} == {0, 1} and {"train_loss", "val_loss", "val_auc"} <= records[0].keys()
    assert json.loads((run / "summary.json").read_text())["auc_mean"] == pytest.approx(summary["auc_mean"])
    ckpt = torch.load(run / "fold_0.pt", weights_only=True)
    assert ckpt["config"]["model"] == "lb" and ckpt["class_names"] == ["negative", "positive"]
    res = evaluate_mil(dict(checkpoint=str(run / "fold_0.pt"), features=paths["features"], labels=paths["labels"],
                            splits=paths["splits"], fold=0, split="test", device="cpu", progress=False))
    assert res["auc"] == pytest.approx(summary["per_fold"][0]["auc"])
    assert res["n"] == 80


def test_the_demo_keeps_its_data_in_the_run_folder(tmp_path):
    run = tmp_path / "demo"
    summary = train_mil(dict(folds=3, fold_indices=[2], epochs=1, stop_epoch=0, embed_dim=8, depth=1,
                             output=str(run), progress=False, device="cpu"))
    assert summary["dataset"] == "digits-bags" and summary["folds"] == 1
    assert {"h5_files", "labels.csv", "splits"} <= set(os.listdir(run / "data"))
    res = evaluate_mil(dict(checkpoint=str(run / "fold_2.pt"), features=str(run / "data"),
                            labels=str(run / "data" / "labels.csv"), splits=str(run / "data" / "splits"), fold=2,
                            progress=False))
    assert res["auc"] == pytest.approx(summary["per_fold"][0]["auc"])
    # a fold checkpoint of lbmamba before the one run format still scores the same
    ckpt = torch.load(run / "fold_2.pt", weights_only=True)
    torch.save({"format": "lbmamba-mil", "version": 1, "model": ckpt["model"], "config": ckpt["model_config"],
                "class_names": ckpt["class_names"], "fold": 2, "epoch": ckpt["epoch"], "seed": 0}, run / "old.pt")
    old = evaluate_mil(dict(checkpoint=str(run / "old.pt"), features=str(run / "data"),
                            labels=str(run / "data" / "labels.csv"), splits=str(run / "data" / "splits"), fold=2,
                            progress=False))
    assert old["auc"] == res["auc"] and old["loss"] == res["loss"]


RESUME_ARGS = ["--folds", "3", "--fold-indices", "0,1", "--epochs", "4", "--stop-epoch", "4", "--embed-dim", "16",
               "--depth", "1", "--no-progress", "--device", "cpu", "--threads", "1"]


def _mil_train(*args):
    """`lbmamba mil train ARGS` in a process of its own, as a user (or a job scheduler) starts it."""
    return subprocess.Popen([sys.executable, "-m", "lbmamba", "mil", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))


def test_a_fold_driver_stopped_mid_fold_resumes_to_the_uninterrupted_result(tiny_bags, monkeypatch):
    """A run that dies in fold 1 (after fold 0 finished) resumes there: finished folds kept, the same results and
    fold checkpoints as a run that never stopped. In this process; the SIGKILLed process is the slow test below."""
    from lbmamba.engine import mil

    cfg = _cfg(tiny_bags, folds=3, fold_indices=[0, 1], model="lb", depth=1, epochs=2, patience=2, stop_epoch=2)
    straight = train_mil(dict(cfg, output=str(tiny_bags / "a")))
    evaluate = mil.FoldTask.evaluate

    def dies_in_fold_1_epoch_2(task, model, count):
        if task.fold == 1 and count == 2:
            raise RuntimeError("the machine went away")
        return evaluate(task, model, count)

    monkeypatch.setattr(mil.FoldTask, "evaluate", dies_in_fold_1_epoch_2)
    with pytest.raises(RuntimeError, match="went away"):
        train_mil(dict(cfg, output=str(tiny_bags / "b")))
    stopped = torch.load(tiny_bags / "b" / "last.pth", weights_only=True)
    assert [r["fold"] for r in stopped["finished"]] == [0] and stopped["fold"] == 1 and stopped["epoch"] == 1
    monkeypatch.setattr(mil.FoldTask, "evaluate", evaluate)
    resumed = train_mil(dict(resume=str(tiny_bags / "b"), progress=False))
    assert resumed["per_fold"] == straight["per_fold"] and resumed["auc_mean"] == straight["auc_mean"]
    for fold in (0, 1):
        sa, sb = (torch.load(tiny_bags / run / f"fold_{fold}.pt", weights_only=True)["model"] for run in ("a", "b"))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    records = (tiny_bags / "b" / "metrics.jsonl").read_text().splitlines()
    epochs = [(r["fold"], r["epoch"]) for r in map(json.loads, records)]
    assert epochs == [(f, e) for f in (0, 1) for e in range(1, 3)]


@pytest.mark.slow  # processes of their own (a minute): the fold driver's resume is tested in this process above
def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    """SIGKILL `lbmamba mil train` after some epochs of fold 1, resume it, compare with a run that never stopped.

    Every run has a process of its own: PyTorch's CPU LayerNorm backward sums in an order that can change
    after a process changes its thread count, so runs are compared as users start them."""
    straight = _mil_train(*RESUME_ARGS, "--output", str(tmp_path / "a"))
    killed = tmp_path / "b"
    proc = _mil_train(*RESUME_ARGS, "--output", str(killed))
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and any(json.loads(line)["fold"] == 1 for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert straight.wait() == 0, straight.stderr.read()[-3000:]
    stopped = torch.load(killed / "last.pth", weights_only=True)
    assert [r["fold"] for r in stopped["finished"]] == [0] and stopped.get("fold") == 1  # mid fold 1
    assert [r[0] for r in csv.reader(open(killed / "summary.csv"))][:2] == ["fold", "0"]  # fold 0's results kept
    resumed = _mil_train("--resume", str(killed), "--no-progress")
    assert resumed.wait() == 0, resumed.stderr.read()[-3000:]
    a, b = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("a", "b"))
    assert a["per_fold"] == b["per_fold"] and a["auc_mean"] == b["auc_mean"]
    for fold in (0, 1):
        sa, sb = (torch.load(tmp_path / run / f"fold_{fold}.pt", weights_only=True)["model"] for run in ("a", "b"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    epochs = [(r["fold"], r["epoch"]) for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [(f, e) for f in (0, 1) for e in range(1, 5)]
    # a finished run has nothing left to do, and says so; another result-changing config is refused
    from lbmamba.cli import main

    assert main(["mil", "train", "--resume", str(killed), "--no-progress"]) == 0
    assert main(["mil", "train", "--resume", str(killed), "--lr", "0.1"]) == 1


# ---------------------------------------------------------------------- bad input
def _cfg(tmp_path, **kw):
    base = dict(features=str(tmp_path / "feats"), labels=str(tmp_path / "labels.csv"), folds=4, model="abmil",
                embed_dim=8, epochs=1, patience=1, stop_epoch=0, output=str(tmp_path / "run"), progress=False,
                device="cpu")
    base.update(kw)
    return base


def test_missing_feature_files(tiny_bags):
    write_labels(tiny_bags / "labels.csv", [(f"s{i}", ["benign", "tumor"][i % 2]) for i in range(8)]
                 + [("ghost1", "tumor"), ("ghost2", "benign")])
    with pytest.raises(UserError, match=r"2 slide\(s\).*no feature file.*ghost1, ghost2.*skip_missing"):
        train_mil(_cfg(tiny_bags))
    assert not (tiny_bags / "run").exists()  # inputs are checked before the run folder exists
    with pytest.warns(UserWarning, match="leaving out 2"):
        summary = train_mil(_cfg(tiny_bags, skip_missing=True))
    assert summary["skipped_missing"] == 2 and summary["folds"] == 4
    assert sorted(os.listdir(tiny_bags / "run" / "splits")) == [f"splits_{k}.csv" for k in range(4)]


def test_feature_dimension_mismatch(tiny_bags):
    write_bag(tiny_bags / "feats", "s3", np.ones((4, 5)), "h5")
    with pytest.raises(UserError, match="feature dimension differs between bags.*4-d.*5-d.*s3"):
        train_mil(_cfg(tiny_bags))


def test_feature_dimension_vs_model(tiny_bags):
    summary = train_mil(_cfg(tiny_bags, fold_indices=[0]))
    ckpt = os.path.join(summary["output"], "fold_0.pt")
    for i in range(8):
        write_bag(tiny_bags / "other", f"s{i}", np.ones((3, 6)), "pt")
    with pytest.raises(UserError, match="model expects 4-d.*6-d"):
        evaluate_mil(dict(checkpoint=ckpt, features=str(tiny_bags / "other"), labels=str(tiny_bags / "labels.csv"),
                          device="cpu", progress=False))
    with pytest.raises(UserError, match="not a `lbmamba mil train` fold checkpoint"):
        evaluate_mil(dict(checkpoint=os.path.join(summary["output"], "last.pth"), features=str(tiny_bags / "feats"),
                          labels=str(tiny_bags / "labels.csv"), progress=False))


def test_empty_bag(tiny_bags):
    write_bag(tiny_bags / "feats", "s5", np.zeros((0, 4)), "h5")
    with pytest.raises(UserError, match=r"1 empty bag\(s\).*s5"):
        train_mil(_cfg(tiny_bags))


def test_single_class_training_split(tiny_bags):
    split_dir = tiny_bags / "splits"
    write_split_file(str(split_dir / "splits_0.csv"), {"train": ["s0", "s2", "s4"], "val": ["s6", "s1"],
                                                       "test": ["s3", "s5", "s7"]})
    with pytest.raises(UserError, match=r"fold 0: the training split has only one class \('benign'"):
        train_mil(_cfg(tiny_bags, splits=str(split_dir), folds=None))


def test_unlabelled_split_slides_and_bad_csv(tiny_bags):
    write_split_file(str(tiny_bags / "splits" / "splits_0.csv"), {"train": ["s0", "s1", "nope"], "val": ["s2"],
                                                                  "test": ["s3"]})
    with pytest.raises(UserError, match="not in .*labels.csv: nope"):
        train_mil(_cfg(tiny_bags, splits=str(tiny_bags / "splits"), folds=None))
    (tiny_bags / "bad.csv").write_text("slide,label\ns0,a\n")
    with pytest.raises(UserError, match="needs a 'slide_id' column"):
        train_mil(_cfg(tiny_bags, labels=str(tiny_bags / "bad.csv")))


def test_inconsistent_arguments(tiny_bags):
    with pytest.raises(UserError, match="features and labels go together"):
        train_mil(dict(features=str(tiny_bags / "feats"), progress=False))
    with pytest.raises(UserError, match="splits needs features and labels"):
        train_mil(dict(splits=str(tiny_bags), progress=False))
    with pytest.raises(UserError, match="'depth' must be >= 0"):
        train_mil(_cfg(tiny_bags, depth=-1))
    assert not (tiny_bags / "run").exists()


def test_skip_missing_also_skips_unreadable_files(tiny_bags):
    (tiny_bags / "feats" / "h5_files" / "s3.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(UserError, match="cannot read feature file .*s3.h5"):
        train_mil(_cfg(tiny_bags))
    with pytest.warns(UserWarning, match="leaving out 0 slide.* and 1 whose file cannot be read: .*s3.h5"):
        summary = train_mil(_cfg(tiny_bags, skip_missing=True))
    assert summary["skipped_unreadable"] == 1 and summary["skipped_missing"] == 0


def test_features_with_nan_are_named_not_blamed_on_the_learning_rate(tiny_bags):
    write_bag(tiny_bags / "feats", "s2", np.array([[1.0, np.nan, 0.0, np.inf]] * 3), "h5")
    with pytest.raises(UserError, match="slide 's2': its features hold 6 NaN / infinite value.*s2.h5"):
        train_mil(_cfg(tiny_bags))


def _epochs_run(val_losses, patience, stop_epoch):
    """Epochs a fold runs on a made-up sequence of validation losses, as the training loop counts them."""
    from lbmamba.engine.mil import should_stop

    best, best_epoch, since_best, epochs = -math.inf, 0, 0, 0
    for loss in val_losses:  # the loop asks before each epoch; the score is minus the validation loss
        if should_stop(epochs, since_best, patience, stop_epoch):
            break
        epochs += 1
        if -loss > best:
            best, best_epoch, since_best = -loss, epochs, 0
        else:
            since_best += 1
    return epochs, best_epoch


def test_early_stopping_counts_epochs_as_clam_does():
    # improves twice, then never: the counter reaches 20 at epoch index 21, but a fold stops only once the
    # 0-based epoch is past stop_epoch 50, so 52 epochs run; the best stays epoch 2 (1-based)
    assert _epochs_run([1.0, 0.9] + [0.95] * 200, patience=20, stop_epoch=50) == (52, 2)
    # improves until epoch index 59, then worse: stops at index 59 + 20
    assert _epochs_run([1.0 - 0.01 * i for i in range(60)] + [0.5] * 100, 20, 50) == (80, 60)
    # the demo's preset (patience 4, stop_epoch 4): at least 6 epochs
    assert _epochs_run([0.5] * 30, patience=4, stop_epoch=4) == (6, 1)  # ties are no improvement
    assert _epochs_run([0.5] * 3, patience=4, stop_epoch=4) == (3, 1)  # the epochs ran out first


def test_scan_chunk_gives_the_same_scores(tiny_bags):
    """`scan_chunk` (mil train / mil eval): the bags' mixer layers in chunks score exactly as whole bags; a mixer
    with a second direction is refused with the key's name."""
    summary = train_mil(_cfg(tiny_bags, model="lb", depth=1, d_state=4, fold_indices=[0], scan_chunk=2))
    ckpt = os.path.join(summary["output"], "fold_0.pt")
    args = dict(checkpoint=ckpt, features=str(tiny_bags / "feats"), labels=str(tiny_bags / "labels.csv"),
                device="cpu", progress=False)
    whole, chunked = evaluate_mil(args), evaluate_mil(dict(args, scan_chunk=2))
    assert whole["n"] == chunked["n"] == 8
    for key in ("loss", "auc", "acc", "f1"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key
    with pytest.raises(UserError, match="scan_chunk: scan_chunk needs a one-direction mixer"):
        train_mil(_cfg(tiny_bags, model="bimamba", depth=1, d_state=4, fold_indices=[0], scan_chunk=2,
                       output=str(tiny_bags / "run2")))
