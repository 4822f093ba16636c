"""Every command's faults as one line on the command line: writes that fail, the wrong checkpoint, predict
without one, a typo'd flag; and the help texts that said otherwise. All in this process (cli.main)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from faults import fail_writes
from lbmamba import cli


@pytest.fixture
def run(capsys, restore_globals):
    """run(*args) -> (exit code, stderr's last line)."""

    def call(*args):
        code = cli.main([str(a) for a in args])
        err = capsys.readouterr().err.strip().splitlines()
        return code, (err[-1] if err else "")

    return call


@pytest.fixture
def patches(tmp_path):
    folder = tmp_path / "patches" / "slide1"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16), (120, 30, 200)).save(folder / "0_0.png")
    return folder.parent


# ------------------------------------------------------------------------------------------ failed writes
@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "1"], ["seg", "train"], ["det", "train"], ["mil", "train"],
])
def test_every_training_command_into_a_read_only_folder_says_so_in_one_line(tmp_path, monkeypatch, run, argv):
    out = tmp_path / "out"
    out.mkdir()
    fail_writes(monkeypatch, out)
    code, line = run(*argv, "--output", out, "--no-progress")
    assert code == 1 and line == f"lbmamba {' '.join(argv[:-2] if argv[0] == 'train' else argv)}: error: cannot " \
                                 f"write {out}/.lock: read-only file system"
    monkeypatch.undo()
    assert os.listdir(out) == []


def test_predict_and_extract_into_a_read_only_folder_say_so_in_one_line(tmp_path, monkeypatch, run, patches):
    ro = tmp_path / "ro"
    ro.mkdir()
    fail_writes(monkeypatch, ro)
    image = next(patches.glob("*/*.png"))
    code, line = run("seg", "predict", "--random-weights", "--set", "num_classes=3", "--inputs", image,
                     "--output", ro / "masks", "--no-progress", "--set", "model_kwargs.depth=4",
                     "--set", "model_kwargs.embed_dim=32")
    assert (code, line) == (1, f"lbmamba seg predict: error: cannot create folder {ro}/masks: read-only file system")
    code, line = run("mil", "extract", "--patches", patches, "--output", ro, "--encoder", "resnet18", "--no-progress")
    assert (code, line) == (1, f"lbmamba mil extract: error: cannot create folder {ro}/h5_files: read-only file "
                               "system")


def test_a_full_disk_while_predict_writes_is_one_line(tmp_path, monkeypatch, run, patches):
    out = tmp_path / "masks"
    out.mkdir()
    image = next(patches.glob("*/*.png"))
    real_save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        if str(fp).startswith(str(out)):
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    code, line = run("seg", "predict", "--random-weights", "--set", "num_classes=3", "--inputs", image,
                     "--output", out, "--no-progress", "--set", "model_kwargs.depth=4",
                     "--set", "model_kwargs.embed_dim=32")
    assert (code, line) == (1, f"lbmamba seg predict: error: cannot write {out}/0_0_mask.png: no space left on "
                               "device")
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------ checkpoints
def _checkpoints(folder):
    sd = {"patch_embed.proj.weight": torch.zeros(2), "head.weight": torch.zeros(2, 2)}
    paths = {
        "classification": {"format": "lbmamba-run", "task": "classification", "model": sd, "config": {}},
        "segmentation": {"format": "lbmamba-run", "model": {"decode_head.conv_seg.weight": torch.zeros(2)},
                         "config": {"model": "lbvim_tiny_patch16_224"}},
        "detection": {"format": "lbmamba-run", "model": {"roi_heads.x": torch.zeros(2)},
                      "config": {"feature_source": None}},
        "MIL": {"format": "lbmamba-run", "task": "mil", "model": {"x": torch.zeros(2)}, "model_config": {}},
    }
    out = {}
    for name, ckpt in paths.items():
        out[name] = folder / f"{name}.pth"
        torch.save(ckpt, out[name])
    return out


def test_every_command_names_the_wrong_kind_of_checkpoint(tmp_path, run):
    ckpts = _checkpoints(tmp_path)
    cases = [
        (["seg", "eval"], "classification", "segmentation",
         ", or give it to `lbmamba seg train --init-checkpoint` for backbone weights"),
        (["seg", "eval"], "detection", "segmentation", ""),
        (["seg", "predict", "--inputs", tmp_path], "MIL", "segmentation", " (made by `lbmamba seg train`)"),
        (["det", "eval"], "segmentation", "detection", ""),
        (["det", "eval"], "classification", "detection",
         ", or give it to `lbmamba det train --init-checkpoint` for backbone weights"),
        (["det", "predict", "--inputs", tmp_path], "segmentation", "detection", ""),
        (["eval"], "detection", "classification", ""),
    ]
    writers = {"classification": "lbmamba train", "segmentation": "lbmamba seg train",
               "detection": "lbmamba det train", "MIL": "lbmamba mil train"}
    for argv, have, want, hint in cases:
        code, line = run(*argv, "--checkpoint", ckpts[have])
        command = " ".join(a for a in argv if not str(a).startswith(("-", "/")))
        assert (code, line) == (1, f"lbmamba {command}: error: checkpoint {ckpts[have]} is a {have} checkpoint (as "
                                   f"`{writers[have]}` writes); `lbmamba {command}` needs a {want} checkpoint{hint}")


def test_mil_eval_names_a_classification_checkpoint(tmp_path, run, tiny_bags):
    ckpt = _checkpoints(tmp_path)["classification"]
    code, line = run("mil", "eval", "--checkpoint", ckpt, "--features", tiny_bags / "feats",
                     "--labels", tiny_bags / "labels.csv")
    assert (code, line) == (1, f"lbmamba mil eval: error: checkpoint {ckpt} is a classification checkpoint (as "
                               "`lbmamba train` writes), not a `lbmamba mil train` fold checkpoint; `lbmamba mil "
                               "eval` needs one")


def test_a_file_that_is_no_checkpoint_says_so(tmp_path, run):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\xe5 not a checkpoint at all" * 10)
    code, line = run("seg", "eval", "--checkpoint", garbage)
    assert (code, line) == (1, f"lbmamba seg eval: error: cannot read checkpoint {garbage}: it is not a checkpoint "
                               "(neither a file torch.save wrote nor a .safetensors file)")


@pytest.mark.parametrize("task", ["seg", "det"])
def test_predict_without_a_checkpoint_is_an_error(tmp_path, run, patches, task):
    code, line = run(task, "predict", "--inputs", patches / "slide1", "--output", tmp_path / "out", "--no-progress")
    assert (code, line) == (1, f"lbmamba {task} predict: error: no checkpoint given: set --checkpoint (the best.pth "
                               f"of a `lbmamba {task} train` run); --random-weights runs an untrained model")
    assert not (tmp_path / "out").exists()


def test_resuming_another_tasks_run_names_it(tmp_path, run):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: x\n")
    torch.save({"format": "lbmamba-run", "task": "detection", "model": {"roi_heads.x": torch.zeros(1)},
                "config": {}}, folder / "last.pth")
    code, line = run("seg", "train", "--resume", folder)
    assert (code, line) == (1, f"lbmamba seg train: error: checkpoint {folder}/last.pth is a detection checkpoint "
                               "(as `lbmamba det train` writes); `lbmamba seg train --resume` needs a segmentation "
                               "checkpoint")


# ------------------------------------------------------------------------------------------ flags and help
def test_an_unknown_flag_gets_the_subcommands_usage_and_the_closest_flag(run, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["seg", "train", "--itters", "5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: lbmamba seg train ")
    assert err.strip().splitlines()[-1] == ("lbmamba seg train: error: unrecognized arguments: --itters 5 (did you "
                                            "mean --iters?)")


def test_help_texts_say_what_the_commands_do(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    mil_train = commands["mil"]._subparsers._group_actions[0].choices["train"].format_help()
    assert "Adam with L2 weight decay by default" in " ".join(mil_train.split())
    for group, name in ((None, "eval"), ("seg", "eval"), ("seg", "predict"), ("det", "eval"), ("det", "predict"),
                        ("mil", "eval")):
        sub = commands[name] if group is None else commands[group]._subparsers._group_actions[0].choices[name]
        text = " ".join(sub.format_help().split())
        assert "mixed precision of the forward pass: bf16 or fp16 (unset: fp32)" in text, (group, name)
        assert "GradScaler" not in text
