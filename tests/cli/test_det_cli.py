"""`lbmamba det train | eval | predict` from the command line: the group's help, flags named as the config keys,
one JSON line, one-line errors, torchrun."""

import json
import os

import pytest
import torch

from conftest import torchrun_lbmamba
from lbmamba.cli import main
from lbmamba.data.detection import write_digit_detection

pytestmark = pytest.mark.usefixtures("one_thread", "restore_globals")

TINY = ["--set", "model_kwargs={embed_dim: 16, depth: 2, patch_size: 8}", "--img-size", "64", "--set",
        "out_channels=16", "--set", "head_conv_channels=16", "--set", "head_fc_channels=32", "--set",
        "rois_per_image=16", "--set", "rpn_post_nms_top_n_train=50", "--set", "rpn_post_nms_top_n_test=20",
        "--batch-size", "2", "--iters", "2", "--set", "warmup_iters=1", "--set", "lr_steps=1", "--no-progress",
        "--device", "cpu", "--set", "log=null"]


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _scenes(root, n_train=6, n_val=2):
    return write_digit_detection(root, n_train=n_train, n_val=n_val, min_size=48, max_size=64, digit_sizes=(16, 32),
                                 max_digits=3)


def test_det_group_lists_its_commands(capsys):
    assert main(["det"]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "predict"))
    with pytest.raises(SystemExit):
        main(["det", "train", "--help"])
    out = capsys.readouterr().out
    assert "--kind" in out and "--img-size" in out and "configs/det/lbvim_tiny.yaml" in out


def test_train_eval_predict_and_clean_errors(tmp_path, capsys):
    data = _scenes(tmp_path / "scenes")
    code, out, err = _cli(["det", "train", "--data", data, "--output", tmp_path / "run", *TINY], capsys)
    assert code == 0, err
    run = json.loads(out.strip().splitlines()[-1])
    assert run["iters"] == 2 and run["num_classes"] == 10 and run["kind"] == "cascade_mask_rcnn"
    code, out, err = _cli(["det", "eval", "--checkpoint", run["checkpoint"], "--no-progress", "--device", "cpu"],
                          capsys)
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    assert scores["images"] == 2 and scores["box_AP"] == pytest.approx(run["val_box_AP"])
    code, out, err = _cli(["det", "predict", "--checkpoint", run["checkpoint"], "--inputs", data / "images" / "val",
                           "--output", tmp_path / "pred", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2
    assert len([p for p in os.listdir(tmp_path / "pred") if p.endswith("_detections.png")]) == 2
    code, out, err = _cli(["det", "train", "--data", tmp_path / "nowhere", *TINY], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"lbmamba det train: error: data folder not found: {tmp_path / 'nowhere'}"
    code, out, err = _cli(["det", "train", "--kind", "faster_rcnn"], capsys)
    assert code == 1 and "kind" in err and "cascade_mask_rcnn" in err
    code, out, err = _cli(["det", "predict", "--checkpoint", run["checkpoint"], "--no-progress"], capsys)
    assert code == 1 and "no inputs given" in err


@pytest.mark.slow  # three processes: the loop's DDP wrap runs by default in test_cli.py's torchrun test
def test_torchrun_two_processes_keep_identical_weights_and_one_evaluation(tmp_path, capsys):
    data = _scenes(tmp_path / "scenes", n_train=8, n_val=3)
    proc = torchrun_lbmamba(["det", "train", "--data", data, "--output", tmp_path / "ddp", *TINY,
                             "--set", "debug_dump_rank_state=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["world_size"] == 2 and res["global_batch_size"] == 4
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}_params.pth", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # the two ranks' shares of the validation set are scored together: the same figures as one process
    code, out, err = _cli(["det", "eval", "--checkpoint", res["last_checkpoint"], "--no-progress", "--device", "cpu"],
                          capsys)
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    assert scores["images"] == 3
    assert scores["box_AP"] == pytest.approx(res["val_box_AP"], abs=1e-9)
    assert scores["mask_AP"] == pytest.approx(res["val_mask_AP"], abs=1e-9)
