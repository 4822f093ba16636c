"""Engine pieces without the command line: configs, checkpoints, RNG, data sets, evaluation, plots."""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from lbmamba.data import DataError, build_image_folder, check_image_folder, load_digits_split
from lbmamba.engine import DEFAULTS, UserError, load_config, parse_override
from lbmamba.engine.bench import read_accuracies
from lbmamba.engine.checkpointing import (
    atomic_save,
    capture_rng_state,
    check_fingerprint,
    load_training_checkpoint,
    restore_rng_state,
)
from lbmamba.engine.classification import _batch_plan, _last_line, evaluate_model, suggest_model_names
from lbmamba.engine.config import config_fingerprint
from lbmamba.engine.distributed import DistInfo
from lbmamba.engine.plots import plot_throughput, plot_training_curves

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ------------------------------------------------------------------------------------------ configs
def test_override_values_are_yaml_with_scientific_floats():
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    assert parse_override("model_kwargs.depth=6") == ("model_kwargs.depth", 6)
    assert parse_override("amp=null") == ("amp", None)
    assert parse_override("aa=rand-m9-mstd0.5-inc1") == ("aa", "rand-m9-mstd0.5-inc1")
    cfg = load_config(overrides={"lr": 5e-4, "epochs": 3.0, "model_kwargs.depth": 6})
    assert cfg["lr"] == 5e-4 and cfg["epochs"] == 3 and isinstance(cfg["epochs"], int)
    assert cfg["model_kwargs"]["depth"] == 6 and cfg["model_kwargs"]["embed_dim"] == DEFAULTS["model_kwargs"]["embed_dim"]


def test_config_errors_name_the_key():
    with pytest.raises(UserError, match="unknown config key 'epoch'.*epochs"):
        load_config(overrides={"epoch": 3})
    with pytest.raises(UserError, match="'epochs' expects an integer"):
        load_config(overrides={"epochs": "many"})
    with pytest.raises(UserError, match="'amp' must be null, bf16 or fp16"):
        load_config(overrides={"amp": "fp8"})
    with pytest.raises(UserError, match="key=value"):
        parse_override("lr")


@pytest.mark.parametrize("name, model, global_batch", [
    ("lbvim_tiny", "lbvim_tiny_patch16_224", 1024),
    ("lbvim_300", "lbvim_300_patch16_224", 1024),
    ("lbvim_small", "lbvim_small_patch16_224", 512),
    ("lbvim_528", "lbvim_528_patch16_224_atthead", 512),
    ("vim_tiny", "vim_tiny_patch16_224", 1024),
    ("vim_small", "vim_small_patch16_224", 512),
])
def test_recipe_configs_hold_the_paper_recipe(name, model, global_batch):
    import timm

    cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg["model"] == model and timm.is_model(model)
    assert cfg["global_batch_size"] == global_batch and cfg["model_kwargs"] == {}
    expected = dict(
        opt="adamw", opt_eps=1e-8, weight_decay=0.05, lr=None, base_lr=1e-3, lr_base_size=512, sched="cosine",
        warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, epochs=300, drop_path=0.05, aa="rand-m9-mstd0.5-inc1",
        color_jitter=0.3, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, smoothing=0.1, reprob=0.25,
        repeated_aug=True, model_ema=True, model_ema_decay=0.99996, crop_pct=0.875, interpolation="bicubic",
        train_interpolation="bicubic", img_size=224, in_chans=3, amp=None,
    )
    assert {k: cfg[k] for k in expected} == expected
    # lr = 1e-3 x global batch / 512 on 8 GPUs and on 2 (gradient accumulation keeps the global batch)
    for world in (8, 2):
        accum, gb, lr = _batch_plan(cfg, DistInfo(world_size=world))
        assert gb == global_batch and accum == global_batch // (cfg["batch_size"] * world)
        assert lr == pytest.approx(1e-3 * global_batch / 512)


def test_digits_config_matches_the_defaults():
    cfg = load_config(os.path.join(CONFIGS, "digits.yaml"))
    assert cfg == load_config()


def test_batch_plan_refuses_a_global_batch_that_does_not_divide():
    cfg = load_config(overrides={"global_batch_size": 1000, "batch_size": 128})
    with pytest.raises(UserError, match="not a multiple"):
        _batch_plan(cfg, DistInfo(world_size=8))


# ------------------------------------------------------------------------------------------ checkpoints
def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "last.pth")
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["last.pth"]
    ckpt = load_training_checkpoint(path)
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["w"], torch.zeros(3))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["last.pth"] and load_training_checkpoint(path)["epoch"] == 2


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


def test_fingerprint_refuses_another_model_or_config():
    cfg = load_config()
    ckpt = {"fingerprint": config_fingerprint(cfg)}
    check_fingerprint(ckpt, config_fingerprint(cfg), "x.pth")
    with pytest.raises(UserError, match="another model.*model_kwargs"):
        check_fingerprint(ckpt, config_fingerprint(load_config(overrides={"model_kwargs.depth": 2})), "x.pth")
    with pytest.raises(UserError, match="another config.*lr"):
        check_fingerprint(ckpt, config_fingerprint(load_config(overrides={"lr": 1e-4})), "x.pth")
    check_fingerprint(ckpt, config_fingerprint(load_config(overrides={"lr": 1e-4})), "x.pth", allow_config_change=True)
    with pytest.raises(UserError, match="not an lbmamba training checkpoint"):
        check_fingerprint({"model": {}}, config_fingerprint(cfg), "x.pth")


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_training_checkpoint(str(bad))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_training_checkpoint(str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------ data
def test_digits_split_is_fixed_and_stratified():
    train_a, val_a = load_digits_split(img_size=32, shift=0)
    train_b, val_b = load_digits_split(img_size=32, shift=0)
    assert len(train_a) + len(val_a) == 1797 and len(val_a) == 360
    assert torch.equal(val_a.targets, val_b.targets) and torch.equal(val_a.images, val_b.images)
    counts = torch.bincount(val_a.targets, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    img, target, bad = train_a[0]
    assert img.shape == (1, 32, 32) and bad == 0 and 0 <= target < 10


def _write_png(path, value=128, size=12):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_safe_image_dataset_flags_and_replaces_unreadable_images(tmp_path, capsys):
    root = tmp_path / "train"
    for i in range(3):
        _write_png(str(root / "a" / f"{i}.png"), 10 * i)
    _write_png(str(root / "b" / "0.png"), 200)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = build_image_folder(str(root), transform=None)
    assert ds.classes == ["a", "b"] and len(ds) == 5
    flags = [ds[i][2] for i in range(len(ds))]
    assert sum(flags) == 1
    bad_index = flags.index(1)
    img, target, _ = ds[bad_index]
    assert isinstance(img, Image.Image)  # a readable substitute
    assert "skipped unreadable image" in capsys.readouterr().err


def test_image_folder_checks(tmp_path):
    with pytest.raises(DataError, match="not found"):
        check_image_folder(str(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        check_image_folder(str(tmp_path / "train"))
    _write_png(str(tmp_path / "train" / "a" / "0.png"))
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DataError, match="empty class folder.*b"):
        check_image_folder(str(tmp_path / "train"))


def test_worker_traceback_is_reduced_to_the_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\nlbmamba.data.images.DataError: 50 consecutive unreadable images\n")
    assert _last_line(wrapped) == "50 consecutive unreadable images"
    assert _last_line("plain message") == "plain message"


# ------------------------------------------------------------------------------------------ evaluation, plots
class _Fixed(nn.Module):
    """Predicts class (pixel mean > 0) with fixed logits."""

    def forward(self, x):
        pos = (x.mean(dim=(1, 2, 3)) > 0).float()
        return torch.stack([1 - pos, pos, torch.zeros_like(pos)], dim=-1) * 5


def test_evaluate_model_figures_and_bad_samples_left_out():
    images = torch.cat([torch.ones(6, 1, 4, 4), -torch.ones(4, 1, 4, 4)])
    targets = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 1])  # 2 wrong
    bad = torch.tensor([0] * 9 + [1])  # the last one is an unreadable-image substitute
    ds = torch.utils.data.TensorDataset(images, targets, bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    out = evaluate_model(_Fixed(), loader, DistInfo())
    assert out["images"] == 9 and out["bad_images"] == 1
    assert out["top1"] == pytest.approx(100 * 8 / 9) and out["top5"] == pytest.approx(100.0)
    assert out["loss"] > 0 and out["images_per_s"] > 0


def test_unknown_model_names_get_suggestions():
    assert "lbvim_tiny_patch16_224" in suggest_model_names("lbvim_tiny_patch16")


def test_plots_are_written(tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_top1": 50 + 10 * e, "val_top5": 90.0}
               for e in range(1, 4)]
    path = plot_training_curves(records, str(tmp_path / "curves.png"), title="t")
    assert os.path.getsize(path) > 1000
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
