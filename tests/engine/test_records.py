"""What a run records: metrics.jsonl, curves.png, summary.json, the line per epoch; bench's accuracy files."""

import json
import os

import pytest

from lbmamba.engine import UserError
from lbmamba.engine.bench import read_accuracies
from lbmamba.engine.plots import plot_curves, plot_throughput
from lbmamba.engine.records import RunRecord, progress

PANELS = [("loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
          ("accuracy", "%", [("val_top1", "top-1")])]


def test_run_record_writes_metrics_curves_and_summary(tmp_path, capsys):
    record = RunRecord(str(tmp_path), PANELS, "title", shown=("epoch", "train_loss"))
    for epoch in (1, 2, 3):
        record.add({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": None, "val_top1": 50.0 + epoch})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines][0] == {"epoch": 1, "train_loss": 1.0, "val_top1": 51.0}
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    assert "epoch 2  train_loss 0.5" in capsys.readouterr().err
    record.finish({"val_top1": 53.0})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"val_top1": 53.0}
    # a resumed run keeps the epochs its checkpoint covers and drops the later ones
    resumed = RunRecord(str(tmp_path), PANELS, keep=lambda r: r["epoch"] <= 2)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # other ranks write nothing
    RunRecord(str(tmp_path / "rank1"), PANELS, enabled=False).add({"epoch": 1})
    assert not (tmp_path / "rank1").exists()


def test_plots_are_written(tmp_path):
    records = [{"fold": f, "epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e + f}
               for f in (0, 1) for e in (1, 2, 3)]
    assert os.path.getsize(plot_curves(records, str(tmp_path / "c.png"), PANELS, "t", group="fold")) > 1000
    assert plot_curves([], str(tmp_path / "none.png"), PANELS) is None
    rows = [{"model": "a", "params_m": 6.4, "infer_img_per_s": 100.0, "top1": 75.0},
            {"model": "b", "params_m": 7.0, "infer_img_per_s": 80.0, "top1": 76.0}]
    assert os.path.getsize(plot_throughput(rows, str(tmp_path / "b.png"), x_key="top1")) > 1000


def test_read_accuracies_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"m1": 75.1, "m2": {"top1": 76.2}}))
    (tmp_path / "b.json").write_text(json.dumps([{"model": "m1", "top1": 70}]))
    (tmp_path / "c.csv").write_text("model,top1\nm1,71.5\n")
    assert read_accuracies(str(tmp_path / "a.json")) == {"m1": 75.1, "m2": 76.2}
    assert read_accuracies(str(tmp_path / "b.json")) == {"m1": 70.0}
    assert read_accuracies(str(tmp_path / "c.csv")) == {"m1": 71.5}
    (tmp_path / "d.json").write_text("[1, 2]")
    assert read_accuracies(str(tmp_path / "d.json")) == {}
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read accuracies"):
        read_accuracies(str(tmp_path / "e.json"))


def test_progress_in_a_log_file_is_plain_lines(capsys):
    from lbmamba.engine.records import _LineProgress

    assert isinstance(progress(range(3), desc="val"), _LineProgress)  # captured stderr is not a terminal
    assert list(_LineProgress(range(3), None, "val", interval=0.0)) == [0, 1, 2]
    with _LineProgress(None, 4, "epoch 1/2", interval=0.0) as bar:
        bar.set_postfix(loss="0.5")
        bar.update(1)
    err = capsys.readouterr().err
    assert "val: 1/3" in err and "epoch 1/2: 1/4" in err and "loss 0.5" in err and "\r" not in err
    assert "val: 3/3" not in err  # the end is not reported: the epoch's own line follows
    assert list(progress(range(2), enabled=False)) == [0, 1] and capsys.readouterr().err == ""


def test_csv_and_tensorboard_logs(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = RunRecord(str(tmp_path / "c"), PANELS, log="csv")
    record.add({"epoch": 1, "train_loss": 0.5})
    record.add({"epoch": 2, "train_loss": 0.25, "val_top1": 90.0})
    rows = list(csv.reader(open(tmp_path / "c" / "metrics.csv")))
    assert rows == [["epoch", "train_loss", "val_top1"], ["1", "0.5", ""], ["2", "0.25", "90.0"]]

    folder = tmp_path / "t"
    record = RunRecord(str(folder), PANELS, group="fold", log="tensorboard")
    for fold, epoch in ((0, 1), (0, 2), (1, 1)):
        record.add({"fold": fold, "epoch": epoch, "val_loss": fold + 1.0 / epoch})
    record.finish({})
    resumed = RunRecord(str(folder), PANELS, group="fold", log="tensorboard", keep=lambda r: r["fold"] == 0)
    resumed.add({"fold": 1, "epoch": 1, "val_loss": 7.0})
    resumed.finish({})
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("fold0/val_loss")] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("fold1/val_loss")] == [(3, 7.0)]  # the resumed step replaces it
