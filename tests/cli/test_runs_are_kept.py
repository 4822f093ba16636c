"""No run is ever lost, and bad input is one line: every command against garbage files, truncated and
foreign checkpoints and output paths that are files; run folders that hold a run; a mismatched
--init-checkpoint; SIGTERM. (Resuming without the original flags and a finished run: test_cli.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lbmamba import cli

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
QUIET = ["--no-progress"]
SMALL = ["--set", "model_kwargs={embed_dim: 32, depth: 1, patch_size: 8}"]

pytestmark = pytest.mark.usefixtures("restore_globals")


@pytest.fixture
def run_cli(capsys):
    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        return code, (json.loads(lines[-1]) if code == 0 and lines else None), err

    return run


def _one_line_error(code, err, command, *fragments):
    lines = err.strip().splitlines()
    assert code == 1 and lines, err
    assert "Traceback" not in err, err
    assert lines[-1].startswith(f"lbmamba {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture
def bad_files(tmp_path):
    """A garbage file, a truncated checkpoint, a Vim checkpoint (another model), and a plain file."""
    import timm

    files = {"garbage": tmp_path / "garbage.pth", "truncated": tmp_path / "truncated.pth",
             "other_model": tmp_path / "vim.pth", "a_file": tmp_path / "a_file"}
    files["garbage"].write_bytes(os.urandom(3000))
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_classes=10)
    torch.save({"model": vim.state_dict()}, files["other_model"])
    data = files["other_model"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["a_file"].write_text("not a folder")
    return files


def test_every_command_answers_bad_files_in_one_line(bad_files, tiny_bags, tmp_path, run_cli):
    f = bad_files
    out = lambda name: tmp_path / "runs" / name
    for kind in ("garbage", "truncated"):
        code, _, err = run_cli("train", *SMALL, "--epochs", 1, "--init-checkpoint", f[kind], "--output", out(kind),
                               *QUIET)
        _one_line_error(code, err, "train", "cannot read checkpoint", str(f[kind]))
        code, _, err = run_cli("eval", "--model", "lbvim_tiny_patch16_224", "--checkpoint", f[kind], "--data", "digits",
                               *QUIET)
        _one_line_error(code, err, "eval", "cannot read checkpoint")
        code, _, err = run_cli("mil", "eval", "--checkpoint", f[kind], "--features", tiny_bags / "feats", "--labels",
                               tiny_bags / "labels.csv", *QUIET)
        _one_line_error(code, err, "mil eval", "cannot read checkpoint")
        code, _, err = run_cli("mil", "extract", "--patches", tmp_path, "--output", out(f"x-{kind}"),
                               "--encoder-checkpoint", f[kind], *QUIET)
        _one_line_error(code, err, "mil extract")
    # another model's checkpoint (a Vim one, with a class token, for an LBVim): its keys are listed, one line
    code, _, err = run_cli("train", *SMALL, "--epochs", 1, "--init-checkpoint", f["other_model"], "--output",
                           out("other"), *QUIET)
    _one_line_error(code, err, "train", "does not fit", "init_partial")
    code, _, err = run_cli("eval", "--model", "lbvim_tiny_patch16_224", "--checkpoint", f["other_model"], "--data",
                           "digits", *SMALL, *QUIET)
    _one_line_error(code, err, "eval", "does not fit")
    code, _, err = run_cli("mil", "eval", "--checkpoint", f["other_model"], "--features", tiny_bags / "feats",
                           "--labels", tiny_bags / "labels.csv", *QUIET)
    _one_line_error(code, err, "mil eval", "not a `lbmamba mil train` fold checkpoint")
    # an output path that is a file
    for command in (["train", *SMALL, "--epochs", 1], ["mil", "train", "--epochs", 1], ["bench", "--models",
                    "lbvim_tiny_patch16_224", "--img-size", 32, "--batch-size", 1, "--iters", 1, "--warmup", 0],
                    ["mil", "extract", "--patches", tmp_path]):
        code, _, err = run_cli(*command, "--output", f["a_file"], *QUIET)
        _one_line_error(code, err, " ".join(command[:2]) if command[0] == "mil" else command[0], "is a file")
    code, _, err = run_cli("bench", "--models", "lbvim_tiny_patch16_224", "--results", f["garbage"], *QUIET)
    _one_line_error(code, err, "bench", "cannot read accuracies")
    code, _, err = run_cli("bench", "--models", "lbvim_tiny_patch16_224", "--batch-size", 0, *QUIET)
    _one_line_error(code, err, "bench", "'batch_size' must be > 0, got 0")
    assert f["a_file"].read_text() == "not a folder"


def test_a_folder_that_holds_a_run_is_refused_and_can_be_moved_aside(tmp_path, run_cli):
    out = tmp_path / "run"
    code, first, err = run_cli("train", *SMALL, "--epochs", 1, "--output", out, *QUIET)
    assert code == 0, err
    best = (out / "best.pth").read_bytes()
    code, _, err = run_cli("train", *SMALL, "--epochs", 1, "--lr", 0.5, "--output", out, *QUIET)
    _one_line_error(code, err, "train", "already holds a run", "--resume", "overwrite")
    assert (out / "best.pth").read_bytes() == best
    code, _, err = run_cli("train", *SMALL, "--epochs", 1, "--output", out, "--overwrite", *QUIET)
    assert code == 0 and "moved the earlier run" in err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "best.pth").read_bytes() == best


def test_an_init_checkpoint_that_does_not_fit_is_refused_unless_partial(tmp_path, run_cli):
    import timm

    other = timm.create_model("lbvim_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_classes=10, in_chans=1)
    torch.save({"model": other.state_dict()}, tmp_path / "deeper.pth")
    code, _, err = run_cli("train", *SMALL, "--epochs", 1, "--init-checkpoint", tmp_path / "deeper.pth", "--output",
                           tmp_path / "strict", *QUIET)
    _one_line_error(code, err, "train", "does not fit", "layers.1.mixer")
    code, res, err = run_cli("train", *SMALL, "--epochs", 1, "--init-checkpoint", tmp_path / "deeper.pth",
                             "--init-partial", "--output", tmp_path / "partial", *QUIET)
    assert code == 0 and "init_checkpoint: " in err and "tensors loaded" in err, err
    trained = torch.load(tmp_path / "partial" / "last.pth", weights_only=True)["model"]
    assert trained.keys() == {k for k in other.state_dict() if not k.startswith("layers.1.")}


def test_sigterm_stops_a_run_with_a_message_and_a_whole_checkpoint(tmp_path):
    out = tmp_path / "run"
    # epochs enough that the run cannot end before the signal even when this process waits for a core a while
    args = [*map(str, SMALL), "--epochs", "500", *QUIET, "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lbmamba", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC))
    deadline = time.time() + 240
    while not (out / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lbmamba train: terminated; the run in") and f"--resume {out}" in last
    assert "Traceback" not in err
    epoch = torch.load(out / "last.pth", weights_only=True)["epoch"]
    assert 1 <= epoch < 500
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or ".tmp." in f]
