"""`lbmamba train / eval / bench` end to end, on the CPU: the default digits run, resume, torchrun, bad input.

Most runs call `lbmamba.cli.main` in this process (saves the interpreter start-up); a few run the real
console entry points (`python -m lbmamba`, `torchrun`) in subprocesses.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lbmamba
from conftest import backbone_params, torchrun_lbmamba
from lbmamba import cli

QUIET = ["--no-progress"]
# a smaller LBVim for the runs that test plumbing rather than accuracy
SMALL = ["--set", "model_kwargs.depth=2", "--set", "model_kwargs.embed_dim=32"]


@pytest.fixture
def run_cli(capsys, restore_globals):
    """run(*args) -> (exit code, JSON of the last stdout line or None, stdout, stderr), in this process."""

    def run(*args):
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        payload = json.loads(lines[-1]) if code == 0 and lines else None
        return code, payload, out, err

    return run


def _env():
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _write_digit_folder(root, classes=(0, 1, 2), per_class=(8, 4), broken=0):
    """An ImageFolder (train/ val/) of 32x32 RGB PNG digits; `broken` unreadable files added to train/."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for c in classes:
        idx = np.flatnonzero(y == c)
        for split, count, offset in (("train", per_class[0], 0), ("val", per_class[1], per_class[0])):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in idx[offset : offset + count]:
                img = (x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
                img = Image.fromarray(img).resize((32, 32), Image.BILINEAR).convert("RGB")
                img.save(os.path.join(folder, f"{i}.png"))
    for b in range(broken):
        with open(os.path.join(root, "train", f"class_{classes[0]}", f"broken_{b}.png"), "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n not really a png")
    return str(root)


FOLDER_MODEL = ["--set", "model_kwargs={embed_dim: 32, depth: 2, patch_size: 8}", "--img-size", "32",
                "--batch-size", "8", "--workers", "0"]  # in_chans: 3 for folders


def _state(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ help and plumbing
@pytest.mark.parametrize("command", [["train"], ["eval"], ["bench"], ["mil", "train"], ["mil", "eval"],
                                     ["mil", "extract"], ["mil", "patch"], ["mil", "heatmap"]], ids=" ".join)
def test_every_command_has_help_listing_its_keys(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"lbmamba {' '.join(command)}" in out and "config keys" in out and "--config" in out and "--set" in out
    if command == ["train"]:
        assert "max_bad_fraction" in out and "--resume" in out and "--threads" in out


def _command_parsers(parser, prefix=()):
    """(command words, parser) of every command (`train`, `mil train`, ...) under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                if sub.get_default("table") is not None:
                    yield (*prefix, word), sub
                yield from _command_parsers(sub, (*prefix, word))


def test_every_no_flag_says_that_it_turns_its_key_off():
    """`--no-progress` must not read "show a progress bar": its help says what giving the flag does."""
    seen = []
    for words, parser in _command_parsers(cli.build_parser()):
        table = parser.get_default("table")
        for action in parser._actions:
            flags = [f for f in action.option_strings if f.startswith("--no-")]
            if not flags or action.help == argparse.SUPPRESS:
                continue
            name = action.dest.split(":", 1)[1]
            key, where = table.keys[name], f"lbmamba {' '.join(words)} {flags[0]}: {action.help!r}"
            assert key.kind == "bool" and key.default is True and action.const is False, where
            assert not action.help.startswith(key.help) and action.help.startswith(key.off_help or "do not "), where
            assert not action.help.startswith("do not also ") and f"sets {name}=false" in action.help, where
            seen.append(flags[0])
    assert "--no-progress" in seen and "--no-train" in seen  # every command's progress bars; bench's training


def test_a_group_without_its_command_shows_its_help(run_cli, capsys):
    code, _, out, _ = run_cli("mil")
    assert code == 2 and "extract" in out and "train" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(command in out for command in ("train", "bench", "seg", "det", "mil"))


def test_python_dash_m_and_a_user_error_exit_cleanly(tmp_path):
    """The real entry point in a process of its own (help and parsing are tested in this process above)."""
    missing = tmp_path / "no_such_dir"
    out = subprocess.run([sys.executable, "-m", "lbmamba", "train", "--data", str(missing)], capture_output=True,
                         text=True, env=_env())
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"lbmamba train: error: data directory not found: {missing}"


# ------------------------------------------------------------------------------------------ the main job
def test_default_training_reaches_90_percent(tmp_path, run_cli):
    """`lbmamba train` (digits, small LBVim, CPU) shortened to 6 epochs: >= 90 % validation top-1."""
    out = tmp_path / "run"
    code, res, _, err = run_cli("train", "--epochs", 6, "--set", "warmup_epochs=1", "--output", out)
    assert code == 0, err
    assert res["val_top1"] >= 90.0, res
    assert res["epochs"] == 6 and res["data"] == "digits" and res["model"] == "lbvim_tiny_patch16_224"
    for name in ("last.pth", "best.pth", "metrics.jsonl", "metrics.csv", "curves.png", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert {"train_loss", "val_loss", "val_top1", "val_top5", "lr"} <= records[-1].keys()
    assert "epoch 6  train_loss" in err and "\r" not in err  # a line per epoch; no bar in a log
    # the best checkpoint evaluates to the figure training reported, from the checkpoint alone
    code, ev, _, err = run_cli("eval", "--checkpoint", out / "best.pth", *QUIET)
    assert code == 0, err
    assert ev["top1"] == pytest.approx(res["best_val_top1"]) and ev["images"] == 360


@pytest.mark.parametrize("data", ["digits", "folder"])
def test_stopped_and_resumed_equals_uninterrupted(data, tmp_path, run_cli):
    # one thread in every run: the default rule counts idle cores, and another thread count sums in another order
    common = ["--epochs", 2, *SMALL, "--set", "model_ema=true", "--set", "model_ema_decay=0.9", "--threads", 1, *QUIET]
    if data == "folder":  # timm augmentation, mixup / cutmix, repeated augmentation, worker processes
        common += ["--data", _write_digit_folder(tmp_path / "data"), *FOLDER_MODEL, "--workers", 2,
                   "--set", "aa=rand-m9-mstd0.5-inc1", "--set", "reprob=0.25", "--set", "mixup=0.8",
                   "--set", "cutmix=1.0", "--set", "repeated_aug=true", "--set", "drop_path=0.1"]
    code, straight, _, err = run_cli("train", *common, "--output", tmp_path / "a")
    assert code == 0, err
    code, first, _, err = run_cli("train", *common, "--output", tmp_path / "b", "--stop-after-epochs", 1)
    assert code == 0 and first["epochs"] == 1 and first["stopped_early"], err
    # the folder run is resumed from its checkpoint with every flag again; the digits run from its folder with
    # none of them: a run resumes with its own config
    resume = [*common, "--resume", tmp_path / "b" / "last.pth"] if data == "folder" else \
        ["--resume", tmp_path / "b", "--threads", 1, *QUIET]
    code, resumed, _, err = run_cli("train", *resume)
    assert code == 0, err
    assert resumed["epochs"] == 2 and resumed["output"] == str(tmp_path / "b")
    a, b = tmp_path / "a" / "last.pth", tmp_path / "b" / "last.pth"
    assert _equal(_state(a), _state(b))
    assert _equal(_state(a, "model_ema"), _state(b, "model_ema"))
    assert resumed["val_top1"] == straight["val_top1"] and resumed["train_loss"] == straight["train_loss"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2
    if data == "folder":
        return
    # resuming a finished run says so and changes nothing
    before = {name: (tmp_path / "b" / name).read_bytes() for name in ("summary.json", "last.pth", "metrics.jsonl")}
    code, again, _, err = run_cli("train", "--resume", tmp_path / "b", *QUIET)
    assert code == 0 and "already finished" in err and again == resumed
    assert all((tmp_path / "b" / name).read_bytes() == content for name, content in before.items())
    # another model or another config is refused with a clear message
    code, _, _, err = run_cli("train", *common, "--set", "model_kwargs.depth=3", "--resume", b)
    assert code == 1 and "cannot resume" in err and "another model" in err and "model_kwargs" in err
    code, _, _, err = run_cli("train", *common, "--lr", "0.01", "--resume", b)
    assert code == 1 and "another config" in err and "lr" in err and "Traceback" not in err


@pytest.mark.slow  # a process of its own: exact resume is the loop's test; a signalled process test_runs_are_kept's
def test_killed_and_resumed_equals_uninterrupted(tmp_path, run_cli):
    """SIGKILL a training process once its first checkpoint is on disk, resume it, compare with a run that
    never stopped."""
    import signal
    import time

    common = ["--epochs", 3, *SMALL, "--set", "model_kwargs.depth=1", "--threads", 1, *QUIET]
    code, straight, _, err = run_cli("train", *common, "--output", tmp_path / "a")
    assert code == 0, err
    killed = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "lbmamba", "train", *map(str, common), "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.time() + 240
        while not (killed / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert (killed / "last.pth").exists()
    stopped_at = torch.load(killed / "last.pth", weights_only=True)["epoch"]
    assert 1 <= stopped_at <= 3
    code, resumed, _, err = run_cli("train", *common, "--resume", killed / "last.pth")
    assert code == 0, err
    assert resumed["epochs"] == 3
    assert _equal(_state(tmp_path / "a" / "last.pth"), _state(killed / "last.pth"))
    assert _equal(_state(tmp_path / "a" / "last.pth", "optimizer")["state"][0],
                  _state(killed / "last.pth", "optimizer")["state"][0])


def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_lbmamba(["train", "--epochs", "1", "--batch-size", "32", *SMALL, "--output", out,
                             "--set", "debug_dump_rank_state=true", "--set", "model_ema=true", *QUIET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["world_size"] == 2 and res["global_batch_size"] == 64 and res["epochs"] == 1
    rank0, rank1 = (torch.load(out / f"rank{r}_params.pth", weights_only=True) for r in (0, 1))
    assert _equal(rank0, rank1)
    # the checkpoint loads in a single process, with the library loader, into the same model
    import timm

    model = timm.create_model("lbvim_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32,
                              embed_dim=32, depth=2, patch_size=8)
    lbmamba.load_checkpoint(model, out / "last.pth")
    assert _equal({k: p.detach() for k, p in model.named_parameters()}, rank0)


# ------------------------------------------------------------------------------------------ ImageFolder, eval, bench
def test_image_folder_train_and_eval(tmp_path, run_cli):
    root = _write_digit_folder(tmp_path / "data")
    code, res, _, err = run_cli("train", "--data", root, "--epochs", 1, *FOLDER_MODEL, "--output", tmp_path / "run",
                                "--set", "aa=rand-m9-mstd0.5-inc1", "--set", "reprob=0.25", "--set", "mixup=0.8",
                                "--set", "cutmix=1.0", "--set", "repeated_aug=true", "--set", "model_ema=true",
                                "--workers", 2, *QUIET)  # worker processes: per-epoch seeds, timm transforms
    assert code == 0, err
    assert res["epochs"] == 1 and res["bad_images"] == 0
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["class_names"] == ["class_0", "class_1", "class_2"]

    # our checkpoint: the model and its arguments come from the checkpoint
    code, ev, _, err = run_cli("eval", "--checkpoint", tmp_path / "run" / "best.pth", "--data", root, *QUIET)
    assert code == 0, err
    assert ev["images"] == 12 and 0 <= ev["top1"] <= 100 and ev["top5"] == 100.0 and ev["images_per_s"] > 0
    code, ev_ema, _, err = run_cli("eval", "--checkpoint", tmp_path / "run" / "best.pth", "--data", root, "--ema",
                                   *QUIET)
    assert code == 0 and ev_ema["checkpoint"].endswith("(EMA)"), err

    # a reference-style {'model': state_dict} checkpoint: name the model; --data may be the val folder itself
    import timm

    model = timm.create_model("lbvim_tiny_patch16_224", num_classes=3, img_size=32, embed_dim=32, depth=2, patch_size=8)
    torch.save({"model": model.state_dict(), "epoch": 300}, tmp_path / "ref.pth")
    code, ev, out, err = run_cli("eval", "--model", "lbvim_tiny_patch16_224", "--checkpoint", tmp_path / "ref.pth",
                                 "--data", os.path.join(root, "val"), "--img-size", 32,
                                 "--set", "model_kwargs={embed_dim: 32, depth: 2, patch_size: 8}", *QUIET)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == ev and ev["num_classes"] == 3 and ev["images"] == 12
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "ref.safetensors"))
    code, ev_st, _, err = run_cli("eval", "--model", "lbvim_tiny_patch16_224", "--checkpoint",
                                  tmp_path / "ref.safetensors",
                                  "--data", root, "--img-size", 32,
                                  "--set", "model_kwargs={embed_dim: 32, depth: 2, patch_size: 8}", *QUIET)
    assert code == 0 and ev_st["top1"] == ev["top1"] and ev_st["loss"] == ev["loss"], err

    # a checkpoint of another shape: one clear line naming the keys
    code, _, _, err = run_cli("eval", "--model", "lbvim_tiny_patch16_224", "--checkpoint", tmp_path / "ref.pth",
                              "--data", root, "--img-size", 32,
                              "--set", "model_kwargs={embed_dim: 48, depth: 2, patch_size: 8}",
                              *QUIET)
    assert code == 1 and "does not fit" in err and len(err.strip().splitlines()) == 1


def test_bench_on_the_cpu(tmp_path, run_cli):
    (tmp_path / "acc.json").write_text(json.dumps({"lbvim_tiny_patch16_224": 75.0, "vim_tiny_patch16_224": 76.1}))
    code, res, out, err = run_cli("bench", "--models", "lbvim_tiny_patch16_224,vim_tiny_patch16_224", "--img-size", 32,
                                  "--batch-size", 2, "--iters", 1, "--warmup", 1, "--model-kwargs", "{depth: 2}",
                                  "--output", tmp_path, "--results", tmp_path / "acc.json")
    assert code == 0, err
    assert "infer_img_per_s" in out  # the table
    rows = {r["model"]: r for r in res["results"]}
    assert rows.keys() == {"lbvim_tiny_patch16_224", "vim_tiny_patch16_224"}
    for row in rows.values():
        assert row["infer_img_per_s"] > 0 and row["train_img_per_s"] > 0
        assert row["infer_peak_mem_mb"] >= 0 and row["train_peak_mem_mb"] >= 0 and row["params_m"] > 0
    assert rows["vim_tiny_patch16_224"]["top1"] == 76.1 and res["batch_size"] == 2 and res["img_size"] == 32
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == res["results"]
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("name,kwargs", backbone_params(with_source=False))
def test_the_other_vision_mambas_train_evaluate_and_bench_like_lbvim(tmp_path, run_cli, name, kwargs):
    root = _write_digit_folder(tmp_path / "data")
    model = ["--model", name, "--set", f"model_kwargs={json.dumps(kwargs)}", "--img-size", "32"]
    code, res, _, err = run_cli("train", "--data", root, "--epochs", 1, "--batch-size", 8, "--workers", 0, *model,
                                "--output", tmp_path / "run", *QUIET)
    assert code == 0, err
    assert res["epochs"] == 1 and 0 <= res["best_val_top1"] <= 100
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["config"]["model"] == name
    code, ev, _, err = run_cli("eval", "--checkpoint", tmp_path / "run" / "best.pth", "--data", root, *QUIET)
    assert code == 0 and ev["images"] == 12 and 0 <= ev["top1"] <= 100, err
    code, bench, _, err = run_cli("bench", "--models", name, "--img-size", 32, "--batch-size", 2, "--iters", 1,
                                  "--warmup", 1, "--model-kwargs", json.dumps(kwargs), "--output", tmp_path / "bench")
    assert code == 0, err
    row, = bench["results"]
    assert row["model"] == name and row["infer_img_per_s"] > 0 and row["train_img_per_s"] > 0


# ------------------------------------------------------------------------------------------ bad input
def test_missing_and_malformed_data(tmp_path, run_cli):
    code, _, _, err = run_cli("train", "--data", tmp_path / "nope", *QUIET)
    assert code == 1 and "data directory not found" in err
    (tmp_path / "flat").mkdir()
    code, _, _, err = run_cli("train", "--data", tmp_path / "flat", *QUIET)
    assert code == 1 and "expected" in err and "train" in err
    root = _write_digit_folder(tmp_path / "data", per_class=(2, 1))
    os.makedirs(os.path.join(root, "train", "class_9"))
    code, _, _, err = run_cli("train", "--data", root, *FOLDER_MODEL, *QUIET)
    assert code == 1 and "empty class folder" in err and "class_9" in err
    code, _, _, err = run_cli("eval", "--checkpoint", tmp_path / "missing.pth", "--model", "lbvim_tiny_patch16_224",
                              "--data", root, *QUIET)
    assert code == 1 and "checkpoint not found" in err


def test_unreadable_images_are_skipped_counted_and_bounded(tmp_path, run_cli):
    # 1 bad of 16 training files, 2 full batches of 8: every file is drawn in the epoch; one is tolerated
    # (max_bad_images 1) although it is more than 1 % of them
    root = _write_digit_folder(tmp_path / "one", per_class=(5, 2), broken=1)
    args = ["train", "--epochs", 1, *FOLDER_MODEL]
    code, res, _, err = run_cli(*args, "--data", root, "--output", tmp_path / "one_bad", *QUIET)
    assert code == 0 and res["bad_images"] == 1, err
    assert "skipped unreadable image" in err and "broken_0.png" in err
    # 3 bad of 18, 16 drawn: at least 2 bad, more than max_bad_images and than 1 %; a larger fraction lets them pass
    root = _write_digit_folder(tmp_path / "three", per_class=(5, 2), broken=3)
    code, _, _, err = run_cli(*args, "--data", root, "--output", tmp_path / "strict", *QUIET)
    assert code == 1 and "too many unreadable images" in err and "max_bad_fraction 0.01" in err
    code, res, _, err = run_cli(*args, "--data", root, "--max-bad-fraction", 0.2, "--output", tmp_path / "lenient",
                                *QUIET)
    assert code == 0 and res["bad_images"] >= 2, err


def test_unknown_model_names_are_refused_with_suggestions(tmp_path, run_cli):
    code, _, _, err = run_cli("train", "--model", "lbvim_tiny_patch16", *QUIET)
    assert code == 1 and "unknown model 'lbvim_tiny_patch16'" in err and "lbvim_tiny_patch16_224" in err
    code, _, _, err = run_cli("eval", "--model", "vim_tiny_pach16_224", "--data", "digits", *QUIET)
    assert code == 1 and "vim_tiny_patch16_224" in err
    code, _, _, err = run_cli("bench", "--models", "lbvim_smal_patch16_224", "--output", tmp_path)
    assert code == 1 and "lbvim_small_patch16_224" in err
    code, _, _, err = run_cli("train", "--set", "epoch=3", *QUIET)
    assert code == 1 and "unknown config key 'epoch'" in err and "epochs" in err
