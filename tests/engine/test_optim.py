"""The optimizer presets (`lbmamba.engine.optim`): each reference rule, read from parameter names as the
reference reads them, and the optimizer each preset builds. The classification, segmentation and detection
rules are also checked against their references in tests/engine/test_*_parts / *_run."""

from __future__ import annotations

import pytest
import torch

from lbmamba.engine.optim import (
    PRESETS,
    create_optimizer,
    detection_layer_id,
    detection_lr_scale,
    param_groups,
    preset_for,
    segmentation_layer_id,
)
from lbmamba.models import build_detector, build_segmentor
from lbmamba.models.mil import create_mil_model

BACKBONE = {"embed_dim": 16, "depth": 4, "patch_size": 8}


def _names(model):
    return {id(p): n for n, p in model.state_dict(keep_vars=True).items()}


def test_every_task_config_names_a_preset():
    assert preset_for("classification", {}) == "vim_imagenet"
    assert preset_for("segmentation", {"decay_rule": "vim"}) == "vim_seg"
    assert preset_for("detection", {"layer_decay_mode": "per_layer"}) == "per_layer_det"
    assert preset_for("mil", {"opt": "adam"}) == "mambamil" and preset_for("mil", {"opt": "adamw"}) == "mambamil_adamw"
    assert {"vim_imagenet", "lbmamba_seg", "vim_seg", "lbmamba_det", "mambamil"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown optimizer preset 'sgd_seg'"):
        param_groups(torch.nn.Linear(2, 2), "sgd_seg", 0.1)


def test_mambamils_adam_puts_l2_on_every_parameter_and_adamw_spares_the_marked_ones():
    model = create_mil_model(model="lb", in_dim=16, num_classes=2, depth=1, embed_dim=16)
    groups = param_groups(model, "mambamil", 1e-5)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    optimizer = create_optimizer("mambamil", groups, 2e-4, {"weight_decay": 1e-5})
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["weight_decay"] == 1e-5
    adamw = param_groups(model, "mambamil_adamw", 1e-5)
    assert [g["weight_decay"] for g in adamw] == [1e-5, 0.0]  # decayed first, as MambaMIL's copy orders them
    spared = {_names(model)[id(p)] for p in adamw[1]["params"]}
    assert spared == model.no_weight_decay()
    assert type(create_optimizer("mambamil_adamw", adamw, 2e-4, {"weight_decay": 1e-5})) is torch.optim.AdamW


def test_the_segmentation_layer_ids_number_embeddings_0_layers_from_1_and_the_rest_last():
    assert segmentation_layer_id("backbone.pos_embed", 4) == 0
    assert segmentation_layer_id("backbone.patch_embed.proj.weight", 4) == 0
    assert segmentation_layer_id("backbone.layers.0.mixer.in_proj.weight", 4) == 1
    assert segmentation_layer_id("backbone.blocks.2.attn.qkv.weight", 4) == 3  # a ViT's blocks
    assert segmentation_layer_id("backbone.layers.3.norm.weight", 4) == 4
    for name in ("backbone.outnorm_0.weight", "decode_head.conv_seg.weight", "backbone.fpn1.0.weight"):
        assert segmentation_layer_id(name, 4) == 5


def test_the_segmentation_rules_read_the_state_dict_names_of_the_adapter():
    model = build_segmentor("lbvim_tiny_patch16_224", 3, img_size=32, head_channels=8, aux_channels=8,
                            backbone_kwargs=BACKBONE)
    names = _names(model)
    no_decay = {names[id(p)] for g in param_groups(model, "lbmamba_seg", 0.05) if g["weight_decay"] == 0
                for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.outnorm_0.weight", "backbone.layers.0.norm.weight"} <= no_decay
    assert "decode_head.bottleneck.bn.weight" not in no_decay  # the heads' BatchNorms keep decay under LBMamba's


def test_the_detection_rules_are_lbmambas_constructor_with_its_quirk():
    # its Mamba-layer branch is commented out: every Mamba layer gets the last id, the embeddings 0
    assert detection_layer_id("backbone.body.layers.2.mixer.A_log", 12) == 13
    assert detection_layer_id("backbone.body.layers.2.mixer.A_log", 4, per_layer=True) == 3
    assert detection_layer_id("backbone.body.pos_embed", 12) == 0
    assert detection_layer_id("backbone.body.blocks.1.attn.qkv.weight", 12) == 2  # ViT blocks keep theirs
    assert detection_layer_id("backbone.fpn.simfp_2.0.weight", 12) == 13  # the neck
    assert detection_lr_scale("backbone.body.pos_embed", 0.7, depth=4) == pytest.approx(0.7 ** 13)
    assert detection_lr_scale("backbone.body.pos_embed", 0.7, depth=4, per_layer=True) == pytest.approx(0.7 ** 5)
    assert detection_lr_scale("roi_heads.box_head.0.weight", 0.7, depth=4) == 1.0
    with pytest.raises(ValueError, match="decay_rate must be in"):
        detection_lr_scale("backbone.body.pos_embed", 1.5, depth=4)
    torch.manual_seed(0)
    vit = build_detector("vit_tiny_patch16_224", 3, img_size=64, out_channels=16, head_conv_channels=16,
                         head_fc_channels=32, backbone_kwargs=dict(img_size=64, embed_dim=32, depth=2, num_heads=2))
    names = _names(vit)
    no_decay = {names[id(p)] for g in param_groups(vit, "lbmamba_det", 0.05, layer_decay=0.7)
                if g["weight_decay"] == 0 for p in g["params"]}
    assert "backbone.body.pos_embed" in no_decay and "backbone.body.blocks.0.norm1.weight" in no_decay
    assert "backbone.body.blocks.0.attn.qkv.bias" not in no_decay


def test_lbmambas_segmentation_rule_matches_substrings_of_mmsegs_names_and_vims_takes_1d_and_biases():
    model = build_segmentor("vim_tiny_patch16_224", 3, img_size=32, head_channels=8, aux_channels=8,
                            backbone_kwargs=BACKBONE)
    names = _names(model)
    lbmamba = {names[id(p)] for g in param_groups(model, "lbmamba_seg", 0.05) if g["weight_decay"] == 0
               for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.layers.0.norm.weight", "backbone.layers.0.norm.bias",
            "backbone.outnorm_3.bias", "backbone.layers.1.mixer.A_log", "backbone.layers.1.mixer.D",
            "backbone.layers.1.mixer.D_b"} <= lbmamba
    # substring keys: A_b_log matches none of them; the heads' BatchNorms are named "bn"
    assert "backbone.layers.1.mixer.A_b_log" not in lbmamba
    assert not any(n.startswith(("decode_head", "auxiliary_head")) for n in lbmamba)
    vim = {names[id(p)] for g in param_groups(model, "vim_seg", 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert "decode_head.bottleneck.bn.weight" in vim and "decode_head.conv_seg.bias" in vim
    assert "backbone.layers.1.mixer.D" in vim and "backbone.layers.1.mixer.A_log" not in vim


def test_detection_lr_scales_per_parameter_as_run_and_as_intended():
    model = build_detector("lbvim_tiny_patch16_224", 3, img_size=64, out_channels=16, head_conv_channels=16,
                           head_fc_channels=32, backbone_kwargs=BACKBONE)
    names = _names(model)

    def scales(preset):
        return {names[id(p)]: g["lr_scale"] for g in param_groups(model, preset, 0.05, layer_decay=0.7)
                for p in g["params"]}

    as_run, intended = scales("lbmamba_det"), scales("per_layer_det")
    assert len(as_run) == len(list(model.parameters()))
    for name in names.values():
        embedding = "pos_embed" in name or "patch_embed" in name
        assert as_run[name] == pytest.approx(0.7 ** 13 if embedding else 1.0), name
        if name.startswith("backbone.body.layers."):
            want = 0.7 ** (4 - int(name.split(".")[3]))
        else:
            want = 0.7 ** 5 if embedding else 1.0
        assert intended[name] == pytest.approx(want), name
