"""The config system: key tables, YAML files with `base:`, `--set` values, the shipped recipes, resume rules."""

import os

import pytest

from lbmamba.engine import (
    BENCH,
    EVAL,
    EXTRACT,
    MIL_EVAL,
    MIL_TRAIN,
    SEG_EVAL,
    SEG_PREDICT,
    SEG_TRAIN,
    TRAIN,
    ConfigTable,
    Key,
    UserError,
)
from lbmamba.engine.config import parse_override
from lbmamba.engine.loaders import batch_plan

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
RECIPES = os.path.join(CONFIGS, "classification")
TABLES = [TRAIN, EVAL, BENCH, MIL_TRAIN, MIL_EVAL, EXTRACT, SEG_TRAIN, SEG_EVAL, SEG_PREDICT]


def test_override_values_are_yaml_with_scientific_floats():
    assert parse_override("lr=1e-3") == ("lr", 1e-3)
    assert parse_override("model_kwargs.depth=6") == ("model_kwargs.depth", 6)
    assert parse_override("amp=null") == ("amp", None)
    assert parse_override("aa=rand-m9-mstd0.5-inc1") == ("aa", "rand-m9-mstd0.5-inc1")
    assert parse_override("fold-indices=0,3") == ("fold_indices", "0,3")
    cfg = TRAIN.load(overrides={"lr": 5e-4, "epochs": 3.0, "model_kwargs.depth": 6})
    assert cfg["lr"] == 5e-4 and cfg["epochs"] == 3 and isinstance(cfg["epochs"], int)
    assert cfg["model_kwargs"] == dict(TRAIN.defaults()["model_kwargs"], depth=6)


def test_config_errors_name_the_key_the_expectation_and_the_value():
    with pytest.raises(UserError, match="unknown config key 'epoch'.*epochs"):
        TRAIN.load(overrides={"epoch": 3})
    with pytest.raises(UserError, match="'epochs' expects an integer, got 'many'"):
        TRAIN.load(overrides={"epochs": "many"})
    with pytest.raises(UserError, match="'amp' must be one of bf16, fp16; got 'fp8'"):
        TRAIN.load(overrides={"amp": "fp8"})
    with pytest.raises(UserError, match="'batch_size' must be > 0, got 0"):
        TRAIN.load(overrides={"batch_size": 0})
    with pytest.raises(UserError, match="'val_fraction' must be in"):
        TRAIN.load(overrides={"val_fraction": 1.5})
    with pytest.raises(UserError, match="'window' expects a positive integer or 'auto'"):
        MIL_TRAIN.load(overrides={"window": 0})
    with pytest.raises(UserError, match="'model' must be one of lb, "):
        MIL_TRAIN.load(overrides={"model": "transmil"})
    with pytest.raises(UserError, match="key=value"):
        parse_override("lr")


def test_list_and_window_kinds_read_text_and_values():
    cfg = MIL_TRAIN.load(overrides={"fold_indices": "0, 3", "window": "4"})
    assert cfg["fold_indices"] == [0, 3] and cfg["window"] == 4
    assert MIL_TRAIN.load(overrides={"fold_indices": 2, "window": "auto"})["fold_indices"] == [2]
    assert BENCH.load(overrides={"models": "a,b"})["models"] == ["a", "b"]
    with pytest.raises(UserError, match="'fold_indices' expects integers"):
        MIL_TRAIN.load(overrides={"fold_indices": "0,x"})


def test_flag_text_keeps_strings_as_typed():
    assert TRAIN.parse_text("data", "01") == "01"  # a folder named 01 stays 01
    assert TRAIN.parse_text("amp", "null") is None
    assert TRAIN.parse_text("epochs", "7") == 7 and TRAIN.parse_text("lr", "5e-4") == 5e-4
    assert MIL_TRAIN.parse_text("window", "auto") == "auto"


def test_yaml_files_with_base_and_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 4\nlr: 1e-3\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nlr: 5e-4\n")
    cfg = TRAIN.load(str(tmp_path / "run.yaml"), {"epochs": 6})
    assert cfg["lr"] == 5e-4 and cfg["epochs"] == 6
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        TRAIN.load(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("epochs: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        TRAIN.load(str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("epohcs: 3\n")
    with pytest.raises(UserError, match="unknown config key 'epohcs' in config file .*epochs"):
        TRAIN.load(str(tmp_path / "typo.yaml"))
    with pytest.raises(UserError, match="config file not found"):
        TRAIN.load(str(tmp_path / "missing.yaml"))


def test_mil_takes_yaml_files_and_set_like_classification(tmp_path):
    (tmp_path / "mil.yaml").write_text("model: mamba\ndepth: 1\nlr: 3e-4\n")
    cfg = MIL_TRAIN.load(str(tmp_path / "mil.yaml"), {"lr": 1e-4, "drop_rate": 0.0})
    assert (cfg["model"], cfg["depth"], cfg["lr"], cfg["drop_rate"]) == ("mamba", 1, 1e-4, 0.0)


@pytest.mark.parametrize("table", TABLES, ids=[t.command for t in TABLES])
def test_every_table_is_consistent(table):
    cfg = table.validate(table.apply(table.defaults(), {}))
    assert set(cfg) == set(table.keys)
    assert "config keys" not in table.describe() and all(name in table.describe() for name, k in table.keys.items()
                                                          if not k.hidden)
    for name, key in table.keys.items():
        assert key.effect in ("model", "run", "none", "once"), name
        assert table.flag(name).startswith("--")


def test_a_no_flag_is_described_by_what_it_turns_off():
    table = ConfigTable("demo", {
        "progress": Key(True, "show a progress bar", flag=True),
        "train": Key(True, "also measure training throughput", flag=True),
        "mask": Key(True, "mask heads; false: boxes only", flag=True, off_help="boxes only, no mask heads"),
        "quiet": Key(False, "print nothing", flag=True),
        "size": Key(8, "the size", flag=True, choices=(8, 16)),
    })
    assert table.flag_help("progress") == "do not show a progress bar; sets progress=false (default true)"
    assert table.flag_help("train") == "do not measure training throughput; sets train=false (default true)"
    assert table.flag_help("mask") == "boxes only, no mask heads; sets mask=false (default true)"
    assert table.flag_help("quiet") == "print nothing"
    assert table.flag_help("size") == "the size (one of: 8, 16)"
    with pytest.raises(ValueError, match="off_help"):
        Key(False, "print nothing", off_help="print something")


# each recipe's resolved values: model, global batch, peak lr (base lr x global batch / 512), weight decay, drop path
RECIPE_TABLE = [
    ("lbvim_tiny", "lbvim_tiny_patch16_224", 1024, 2e-3, 0.05, 0.05),
    ("lbvim_300", "lbvim_300_patch16_224", 1024, 2e-3, 0.05, 0.05),
    ("lbvim_small", "lbvim_small_patch16_224", 512, 1e-3, 0.05, 0.05),
    ("lbvim_528", "lbvim_528_patch16_224_atthead", 512, 1e-3, 0.05, 0.05),
    ("vim_tiny", "vim_tiny_patch16_224", 1024, 1e-3, 0.1, 0.0),  # the Vim repository's Vim-T script
    ("vim_small", "vim_small_patch16_224", 512, 1e-3, 0.05, 0.05),
]


@pytest.mark.parametrize("name, model, global_batch, lr, weight_decay, drop_path", RECIPE_TABLE,
                         ids=[r[0] for r in RECIPE_TABLE])
def test_recipe_configs_hold_the_reference_recipes(name, model, global_batch, lr, weight_decay, drop_path):
    import timm

    cfg = TRAIN.load(os.path.join(RECIPES, f"{name}.yaml"))
    assert cfg["model"] == model and timm.is_model(model)
    assert cfg["global_batch_size"] == global_batch and cfg["model_kwargs"] == {}
    assert (cfg["weight_decay"], cfg["drop_path"]) == (weight_decay, drop_path)
    expected = dict(
        opt="adamw", opt_eps=1e-8, lr=None, lr_base_size=512, sched="cosine", sched_on_updates=False,
        warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, epochs=300, aa="rand-m9-mstd0.5-inc1",
        color_jitter=0.3, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, smoothing=0.1, reprob=0.25,
        repeated_aug=True, model_ema=True, model_ema_decay=0.99996, crop_pct=0.875, interpolation="bicubic",
        train_interpolation="bicubic", img_size=224, in_chans=3, amp=None, no_decay_ssm=False, scale=[0.08, 1.0],
        hflip=0.5,
    )
    assert {k: cfg[k] for k in expected} == expected
    # the same global batch and lr on 8 GPUs and on 2 (gradient accumulation keeps the global batch)
    for world in (8, 2):
        accum, gb, peak = batch_plan(cfg, world)
        assert gb == global_batch and accum == global_batch // (cfg["batch_size"] * world)
        assert peak == pytest.approx(lr)


def test_digits_config_matches_the_defaults():
    assert TRAIN.load(os.path.join(RECIPES, "digits.yaml")) == TRAIN.load()


def test_batch_plan_refuses_a_global_batch_that_does_not_divide():
    cfg = TRAIN.load(overrides={"global_batch_size": 1000, "batch_size": 128})
    with pytest.raises(UserError, match="not a multiple"):
        batch_plan(cfg, 8)


def test_resume_keeps_the_runs_config_and_refuses_changes_that_alter_the_result():
    table = ConfigTable("demo", {
        "width": Key(8, "model width", effect="model"),
        "lr": Key(0.1, "learning rate"),
        "threads": Key(1, "threads", effect="none"),
        "stop_after": Key(None, "this invocation only", kind="int", effect="once"),
    })
    saved = table.load(overrides={"lr": 0.5, "threads": 2, "stop_after": 1})
    # nothing given: the run's own config, without what applied to one invocation only
    assert table.resume(saved, {}, "from run") == dict(saved, stop_after=None)
    # the same values again, and keys that do not change the result, are fine
    assert table.resume(saved, {"lr": 0.5, "threads": 4}, "from run")["threads"] == 4
    with pytest.raises(UserError, match="another config \\(lr: run 0.5 vs now 0.2\\).*threads"):
        table.resume(saved, {"lr": 0.2}, "from run")
    assert table.resume(saved, {"lr": 0.2}, "from run", allow_change=True)["lr"] == 0.2
    with pytest.raises(UserError, match="another model \\(width: run 8 vs now 16\\)"):
        table.resume(saved, {"width": 16}, "from run", allow_change=True)


def test_mil_configs_spell_out_the_presets():
    from lbmamba.engine.mil import DIGITS_PRESET, PAPER_PRESET

    paper = MIL_TRAIN.load(os.path.join(CONFIGS, "mil", "mambamil.yaml"))
    assert {k: paper[k] for k in PAPER_PRESET} == PAPER_PRESET and paper["model"] == "lb"
    demo = MIL_TRAIN.load(os.path.join(CONFIGS, "mil", "digits_bags.yaml"))
    assert {k: demo[k] for k in DIGITS_PRESET} == DIGITS_PRESET
    assert demo == dict(MIL_TRAIN.load(), **DIGITS_PRESET)  # the defaults, with the demo's preset
    for name in ("tcga_nsclc", "bracs"):  # MambaMIL's scripts for these data sets sample class-balanced
        cfg = MIL_TRAIN.load(os.path.join(CONFIGS, "mil", f"{name}.yaml"))
        assert cfg["balanced"] and dict(cfg, balanced=False) == paper


# the papers' ADE20K recipes: (config, backbone, neck, head channels, global batch, iterations, lr, weight decay,
# layer decay, schedule, what takes no weight decay, backbone norm)
SEG_RECIPES = [
    ("lbvim_tiny", "lbvim_tiny_patch16_224", "none", 512, 16, 160000, 6e-5, 0.01, None, "warmup_then_poly", "lbmamba",
     "layernorm"),
    ("lbvim_small", "lbvim_small_patch16_224", "none", 512, 16, 160000, 6e-5, 0.01, None, "warmup_then_poly",
     "lbmamba", "layernorm"),
    ("vim_tiny", "vim_tiny_patch16_224", "vim", 192, 32, 60000, 1e-4, 0.05, 0.92, "poly_with_warmup", "vim", "rmsnorm"),
    ("vim_small", "vim_small_patch16_224", "vim", 384, 32, 60000, 1e-4, 0.05, 0.92, "poly_with_warmup", "vim",
     "rmsnorm"),
]


@pytest.mark.parametrize("recipe", SEG_RECIPES, ids=[r[0] for r in SEG_RECIPES])
def test_segmentation_configs_hold_the_reference_recipes(recipe):
    name, model, neck, head, global_batch, iters, lr, wd, layer_decay, schedule, rule, norm = recipe
    cfg = SEG_TRAIN.load(os.path.join(CONFIGS, "seg", f"{name}.yaml"))
    got = (cfg["model"], cfg["neck"], cfg["head_channels"], cfg["global_batch_size"], cfg["iters"], cfg["lr"],
           cfg["weight_decay"], cfg["layer_decay"], cfg["schedule"], cfg["decay_rule"], cfg["backbone_norm"])
    assert got == recipe[1:]
    common = dict(layout="ade20k", reduce_zero_label=True, num_classes=150, scale=[2048, 512], ratio_range=[0.5, 2.0],
                  crop_size=512, cat_max_ratio=0.75, test_scale=[2048, 512], eval_mode="slide", eval_stride=341,
                  aux_channels=256, aux_weight=0.4, dropout=0.1, feature_source="mixer", out_indices=[5, 11, 17, 23],
                  warmup_iters=1500, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0, betas=[0.9, 0.999])
    assert {k: cfg[k] for k in common} == common
    for world in (1, 2):  # fewer GPUs keep the global batch through gradient accumulation
        assert batch_plan(cfg, world)[1:] == (global_batch, lr)


@pytest.mark.parametrize("name, model", [("lbvim_tiny", "lbvim_tiny_patch16_224"),
                                         ("vim_tiny", "vim_tiny_patch16_224")])
def test_detection_configs_hold_lbmambas_recipe_and_build(name, model):
    from lbmamba.engine.detection import DET_TRAIN, _build

    cfg = DET_TRAIN.load(os.path.join(CONFIGS, "det", f"{name}.yaml"))
    recipe = dict(model=model, kind="cascade_mask_rcnn", img_size=1024, lsj_ratio=[0.1, 2.0], hflip=0.5,
                  backbone_norm="rmsnorm", drop_path=0.1, out_channels=256, head_conv_channels=256,
                  head_fc_channels=1024, rois_per_image=512, rpn_post_nms_top_n_train=2000,
                  rpn_post_nms_top_n_test=1000, global_batch_size=64, iters=184375, lr=1e-4, weight_decay=0.05,
                  clip_grad=35.0, amp="fp16", schedule="warmup_then_step", lr_steps=[163889, 177546], lr_gamma=0.1,
                  warmup_iters=250, warmup_ratio=0.001, layer_decay_mode="lbmamba", layer_decay=0.7, num_classes=80)
    assert {k: cfg[k] for k in recipe} == recipe
    for world in (1, 8):
        assert batch_plan(cfg, world)[1:] == (64, 1e-4)
    detector = _build(cfg, cfg["num_classes"])  # no forward: the full-size model only has to build
    assert detector.backbone.body.model.class_token is None  # LBMamba's detection backbone has none
    assert len(detector.roi_heads.stages) == 3 and detector.backbone.fpn is not None
