"""`lbmamba seg train | eval | predict` from the command line: the group's help, flags named as the config keys,
one JSON line, one-line errors."""

import json

import pytest
import torch

from conftest import torchrun_lbmamba
from lbmamba.cli import main
from lbmamba.data import write_digit_scenes

pytestmark = pytest.mark.usefixtures("one_thread", "restore_globals")

TINY = ["--set", "model_kwargs={embed_dim: 16, depth: 4, patch_size: 8}", "--set", "head_channels=8", "--set",
        "aux_channels=8", "--crop-size", "32", "--set", "scale=64,32", "--set", "test_scale=64,32", "--batch-size",
        "2", "--iters", "2", "--set", "warmup_iters=1", "--no-progress", "--device", "cpu", "--set", "log=null"]


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_seg_group_lists_its_commands(capsys):
    assert main(["seg"]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "predict"))
    with pytest.raises(SystemExit):
        main(["seg", "train", "--help"])
    out = capsys.readouterr().out
    assert "--crop-size" in out and "--eval-mode" in out and "decay_rule" in out


def test_train_eval_predict_and_clean_errors(tmp_path, capsys):
    data = write_digit_scenes(tmp_path / "scenes", n_train=6, n_val=2)
    code, out, err = _cli(["seg", "train", "--data", data, "--output", tmp_path / "run", *TINY], capsys)
    assert code == 0, err
    run = json.loads(out.strip().splitlines()[-1])
    assert run["iters"] == 2 and run["num_classes"] == 11 and run["output"] == str(tmp_path / "run")
    code, out, err = _cli(["seg", "eval", "--checkpoint", run["checkpoint"], "--no-progress", "--device", "cpu"],
                          capsys)
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    assert scores["images"] == 2 and "mIoU" in err.splitlines()[-1] or "mean" in err
    code, out, err = _cli(["seg", "predict", "--checkpoint", run["checkpoint"], "--inputs", data / "images" / "val",
                           "--output", tmp_path / "pred", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["files"] == 6
    code, out, err = _cli(["seg", "train", "--data", tmp_path / "nowhere", *TINY], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"lbmamba seg train: error: data folder not found: {tmp_path / 'nowhere'}"
    code, out, err = _cli(["seg", "train", "--eval-mode", "sliding"], capsys)
    assert code == 1 and "eval_mode" in err and "slide" in err
    code, out, err = _cli(["seg", "predict", "--checkpoint", run["checkpoint"], "--no-progress"], capsys)
    assert code == 1 and "no inputs given" in err


@pytest.mark.slow  # the DDP wrap is the loop's, run by default in the classification torchrun test
def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    data = write_digit_scenes(tmp_path / "scenes", n_train=8, n_val=2)
    proc = torchrun_lbmamba(["seg", "train", "--data", data, "--output", tmp_path / "ddp", *TINY,
                             "--set", "debug_dump_rank_state=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["world_size"] == 2 and res["global_batch_size"] == 4
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}_params.pth", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
