"""The UperNet segmentor: feature pyramids, mmseg's parameter names, losses, inference modes, weight
loading and optimiser helpers (the CPU benchmark's quick run: benchmarks/tests/test_seg_cpu.py)."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import lbmamba.nn.mixer as mixer_module
from conftest import backbone_params
from lbmamba.models import (
    BackboneAdapter,
    CheckpointMismatchError,
    Segmentor,
    build_segmentor,
    load_backbone_weights,
    predict_logits,
    resample_pos_embed,
)
from lbmamba.models.dense.backbone import default_out_indices
from lbmamba.models.dense.uper_head import FCNHead, UPerHead
from lbmamba.ops import resolve_window

K = 5  # classes
TINY = dict(embed_dim=32, depth=4, patch_size=16)  # every backbone here: 4 layers of width 32
HEADS = dict(head_channels=16, aux_channels=8)


def tiny(name="lbvim_tiny_patch16_224", seed=0, img_size=64, backbone_kwargs=None, **kwargs):
    torch.manual_seed(seed)
    return build_segmentor(name, K, img_size=img_size, backbone_kwargs=dict(TINY, **(backbone_kwargs or {})),
                           **dict(HEADS, **kwargs))


def randomise(model, seed=1, scale=0.05):
    """Perturb every parameter and BN statistic so that equalities cannot hold by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
    return model


def images(batch=2, height=64, width=64, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


CONV_MODULE = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


# ------------------------------------------------------------------------------------------- pyramids
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (48, 80)])
def test_pyramid_shapes_without_neck_are_four_stride_16_maps(size):
    model = tiny().eval()
    assert model.backbone.out_channels == [32] * 4 and model.backbone.out_strides == [16] * 4
    with torch.no_grad():
        feats = model.backbone(images(height=size[0], width=size[1]))
    assert [tuple(f.shape) for f in feats] == [(2, 32, size[0] // 16, size[1] // 16)] * 4


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (48, 80)])
def test_pyramid_shapes_with_vims_neck_have_strides_4_8_16_32(size):
    model = tiny("vim_tiny_patch16_224", neck="vim").eval()
    assert model.backbone.out_strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model.backbone(images(height=size[0], width=size[1]))
    h, w = size[0] // 16, size[1] // 16
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4 * h, 4 * w), (2, 32, 2 * h, 2 * w), (2, 32, h, w),
                                                (2, 32, h // 2, w // 2)]


def test_vims_neck_for_patch_8_follows_vims_other_branch():
    model = tiny(neck="vim", backbone_kwargs=dict(patch_size=8)).eval()
    with torch.no_grad():
        feats = model.backbone(images(height=64, width=96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize("neck", ["none", "vim"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (50, 70)])
def test_segmentor_logits_have_the_input_size(neck, size):
    model = tiny(neck=neck).eval()
    with torch.no_grad():
        logits = model(images(height=size[0], width=size[1]))
    assert logits.shape == (2, K, *size)


def test_default_out_indices_are_evenly_spaced_and_end_with_the_last_layer():
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(4) == (0, 1, 2, 3)
    model = build_segmentor("lbvim_tiny_patch16_224", K, img_size=64, backbone_kwargs=dict(embed_dim=32), **HEADS)
    assert model.backbone.out_indices == (5, 11, 17, 23) and model.num_layers == 24


def test_layers_after_the_last_output_the_classifier_and_final_norm_are_removed():
    model = tiny(out_indices=(0, 1, 2, -3), backbone_kwargs=dict(depth=6))  # layers 4 and 5 are never read
    assert model.backbone.out_indices == (0, 1, 2, 3) and model.num_layers == 4
    keys = list(model.state_dict())
    assert "backbone.layers.3.mixer.D" in keys and not any(k.startswith("backbone.layers.4") for k in keys)
    assert not any(k.startswith(("backbone.head", "backbone.norm_f")) for k in keys)


# ------------------------------------------------------------------------------------------- image order
def _by_hand(model, x, source):
    """The four maps of a 4-layer LBVim from its blocks: flip after every layer, the outputs of the
    odd (reversed) layers flipped back, each through its outnorm, reshaped row-major to the patch grid."""
    vm = model.backbone.model
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    h = vm.patch_embed.proj(x).flatten(2).transpose(1, 2) + resample_pos_embed(vm.pos_embed, grid, (4, 4))
    r, outs = None, []
    for i, layer in enumerate(vm.layers):
        h, r = layer(h, r)
        y = h if source == "mixer" else r + h
        outs.append(y.flip(1) if i % 2 else y)
        h, r = h.flip(1), r.flip(1)
    return [getattr(model.backbone, f"outnorm_{i}")(y).reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
            for i, y in enumerate(outs)]


@pytest.mark.parametrize("source", ["mixer", "residual"])
def test_adapter_maps_of_a_flip_every_layer_model_equal_the_blocks_by_hand(source):
    model = randomise(tiny(feature_source=source, img_size=64)).eval()
    x = images(height=64, width=96)  # a 4 x 6 grid: rows and columns cannot be confused
    with torch.no_grad():
        for got, want in zip(model.backbone(x), _by_hand(model, x, source)):
            torch.testing.assert_close(got, want)


def test_mixer_and_residual_sources_differ():
    mixer = randomise(tiny(feature_source="mixer")).eval()
    residual = randomise(tiny(feature_source="residual")).eval()
    assert all(torch.equal(a, b) for a, b in zip(mixer.state_dict().values(), residual.state_dict().values()))
    with torch.no_grad():
        a, b = mixer.backbone(images()), residual.backbone(images())
    assert all(not torch.allclose(p, q, atol=1e-3) for p, q in zip(a, b))


def test_vim_class_token_is_removed_from_the_maps():
    model = randomise(tiny("vim_tiny_patch16_224")).eval()
    x = images(height=64, width=96)
    vm = model.backbone.model
    with torch.no_grad():
        inter = vm.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True,
                                         source="mixer")
        assert inter[0].shape == (2, 24, 32)  # 25 tokens in the sequence, 24 patches out
        for i, (got, want) in enumerate(zip(model.backbone(x), inter)):
            want = getattr(model.backbone, f"outnorm_{i}")(want).reshape(2, 4, 6, 32).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, want)


def test_lb_window_auto_follows_the_token_count(monkeypatch):
    seen = []
    real = mixer_module.selective_scan_fn

    def spy(*args, **kwargs):
        seen.append(resolve_window(kwargs["window"], args[0].shape[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mixer_module, "selective_scan_fn", spy)
    model = tiny(backbone_kwargs=dict(patch_size=8)).eval()
    with torch.no_grad():
        for (height, width), window in [((64, 64), 4), ((128, 128), 8), ((136, 128), 16)]:  # 64 / 256 / 272 tokens
            seen.clear()
            assert model(images(1, height, width)).shape[-2:] == (height, width)  # pos_embed resampled too
            assert seen == [window] * 4


# ------------------------------------------------------------------------------------------- mmseg names
def test_uperhead_state_dict_keys_are_mmsegs():
    head = UPerHead([32, 32, 32, 32], 16, K)
    conv_modules = [
        "psp_modules.0.1", "psp_modules.1.1", "psp_modules.2.1", "psp_modules.3.1",
        "bottleneck",
        "lateral_convs.0", "lateral_convs.1", "lateral_convs.2",
        "fpn_convs.0", "fpn_convs.1", "fpn_convs.2",
        "fpn_bottleneck",
    ]
    expected = ["conv_seg.weight", "conv_seg.bias"] + [f"{m}.{k}" for m in conv_modules for k in CONV_MODULE]
    assert list(head.state_dict()) == expected
    sd = head.state_dict()
    assert sd["psp_modules.0.1.conv.weight"].shape == (16, 32, 1, 1)
    assert sd["bottleneck.conv.weight"].shape == (16, 32 + 4 * 16, 3, 3)
    assert sd["lateral_convs.0.conv.weight"].shape == (16, 32, 1, 1)
    assert sd["fpn_convs.0.conv.weight"].shape == (16, 16, 3, 3)
    assert sd["fpn_bottleneck.conv.weight"].shape == (16, 4 * 16, 3, 3)
    assert sd["conv_seg.weight"].shape == (K, 16, 1, 1)


def test_fcnhead_state_dict_keys_are_mmsegs():
    head = FCNHead(32, 8, K)
    assert list(head.state_dict()) == ["conv_seg.weight", "conv_seg.bias"] + [f"convs.0.{k}" for k in CONV_MODULE]
    assert head.state_dict()["convs.0.conv.weight"].shape == (8, 32, 3, 3)
    two = FCNHead(32, 8, K, num_convs=2, concat_input=True)
    assert [k for k in two.state_dict() if k.endswith("conv.weight")] == [
        "convs.0.conv.weight", "convs.1.conv.weight", "conv_cat.conv.weight"]


def test_segmentor_keys_follow_encoder_decoder_and_the_reference_backbones():
    lb = tiny().state_dict()
    assert {k.split(".")[0] for k in lb} == {"backbone", "decode_head", "auxiliary_head"}
    assert [k for k in lb if k.startswith("backbone.outnorm")] == [
        f"backbone.outnorm_{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert "backbone.layers.3.mixer.A_log" in lb and "backbone.layers.0.norm.bias" in lb
    assert not any(k.startswith(("backbone.head", "backbone.norm_f")) for k in lb)  # deleted, as the references
    vim = tiny("vim_tiny_patch16_224", neck="vim").state_dict()
    assert [k for k in vim if k.startswith("backbone.fpn")] == [
        "backbone.fpn1.0.weight", "backbone.fpn1.0.bias", "backbone.fpn1.1.weight", "backbone.fpn1.1.bias",
        "backbone.fpn1.1.running_mean", "backbone.fpn1.1.running_var", "backbone.fpn1.1.num_batches_tracked",
        "backbone.fpn1.3.weight", "backbone.fpn1.3.bias", "backbone.fpn2.0.weight", "backbone.fpn2.0.bias"]
    assert not any("outnorm" in k for k in vim)  # Vim's backbone has no per-output norms


def test_an_mmseg_format_checkpoint_loads_with_strict_true(tmp_path):
    source = randomise(tiny(seed=3))
    path = tmp_path / "iter_160000.pth"
    torch.save({"meta": {"iter": 160000}, "state_dict": source.state_dict()}, path)
    target = tiny(seed=4)
    target.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    target = tiny(seed=4)
    report = load_backbone_weights(target, path)
    assert report.kind == "segmentor" and not report.missing_keys and not report.unexpected_keys
    assert len(report.loaded) == len(source.state_dict())
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_segmentor_state_dict_of_another_image_size_resizes_pos_embed():
    source = randomise(tiny(img_size=32))
    target = tiny(img_size=64)
    report = load_backbone_weights(target, {"state_dict": source.state_dict()})
    assert target.backbone.model.pos_embed.shape == (1, 16, 32) and "pos_embed resized" in report.summary()
    torch.testing.assert_close(target.decode_head.conv_seg.weight, source.decode_head.conv_seg.weight)


# ------------------------------------------------------------------------------------------- losses
def test_losses_are_mmsegs_cross_entropy_with_aux_weight_0_4():
    model = randomise(tiny()).eval()  # eval: no dropout, BN running statistics
    x = images(height=64, width=96)
    masks = torch.randint(0, K, (2, 64, 96), generator=torch.Generator().manual_seed(5))
    masks[:, :10] = 255
    losses = model.losses(x, masks)
    with torch.no_grad():
        feats = model.backbone(x)
        logits = F.interpolate(model.decode_head(feats), size=(64, 96), mode="bilinear", align_corners=False)
        aux = F.interpolate(model.auxiliary_head(feats), size=(64, 96), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, masks, ignore_index=255, reduction="none")
    decode = per_pixel.sum() / masks.numel()  # mmseg's avg_non_ignore=False: ignored pixels count as 0
    aux_loss = 0.4 * F.cross_entropy(aux, masks, ignore_index=255, reduction="none").sum() / masks.numel()
    torch.testing.assert_close(losses["loss_decode"], decode)
    torch.testing.assert_close(losses["loss_aux"], aux_loss)
    torch.testing.assert_close(losses["loss"], decode + aux_loss)


def test_a_training_step_reaches_every_parameter():
    model = tiny("vim_tiny_patch16_224", neck="vim").train()
    masks = torch.randint(0, K, (2, 64, 64))
    model.losses(images(), masks)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused  # DDP needs no find_unused_parameters


def test_training_on_a_batch_of_one_image_says_why_it_cannot():
    model = tiny().train()
    with pytest.raises(ValueError, match="batch of 1 image.*at least 2 images per process"):
        model.losses(images(1), torch.zeros(1, 64, 64, dtype=torch.long))


def test_sync_batchnorm_conversion_keeps_the_state_dict_and_the_output():
    model = randomise(tiny("vim_tiny_patch16_224", neck="vim")).eval()
    x = images()
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert list(synced.state_dict()) == keys
    assert isinstance(synced.backbone.fpn1[1], nn.SyncBatchNorm)
    assert isinstance(synced.decode_head.psp_modules[0][1].bn, nn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    with torch.no_grad():
        torch.testing.assert_close(synced(x), before)
    synced.train()
    synced.losses(x, torch.zeros(2, 64, 64, dtype=torch.long))["loss"].backward()  # one process: plain BN maths


def test_the_wrapped_backbone_is_a_submodule_whose_keys_sit_at_the_top_of_the_state_dict():
    model = tiny("vim_tiny_patch16_224", neck="vim")
    assert model.backbone.model in list(model.backbone.children())
    names = [name for name, _ in model.named_parameters()]
    assert "backbone.model.layers.3.mixer.A_log" in names and "backbone.fpn1.0.weight" in names
    keys = list(model.state_dict())
    assert not any(".model." in k for k in keys)
    references = ["backbone." + model.backbone.state_dict_key(n[len("backbone."):]) if n.startswith("backbone.")
                  else n for n in names]
    assert references == [k for k in keys if k in set(references)]  # the same tensors in the same order
    assert model.backbone.state_dict_key("model.pos_embed") == "pos_embed"
    assert model.backbone.state_dict_key("outnorm_0.weight") == "outnorm_0.weight"


def test_load_state_dict_names_missing_and_unexpected_keys_as_the_checkpoint_does():
    model = tiny()
    source = randomise(tiny(seed=3)).state_dict()
    model.load_state_dict(dict(reversed(list(source.items()))))  # strict, in any order
    assert all(torch.equal(source[k], v) for k, v in model.state_dict().items())
    state = dict(source)
    del state["backbone.layers.0.mixer.D"]
    state["backbone.head.weight"] = torch.zeros(1)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["backbone.layers.0.mixer.D"]
    assert result.unexpected_keys == ["backbone.head.weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "backbone.layers.0.mixer.D"'):
        model.load_state_dict(state)


@pytest.mark.slow
def test_the_segmentor_compiles_to_the_same_logits():
    model = randomise(tiny("vim_tiny_patch16_224", neck="vim")).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x))


# ------------------------------------------------------------------------------------------- inference
def test_sliding_window_equals_whole_image_when_the_crop_covers_the_image():
    model = randomise(tiny()).eval()
    x = images(height=48, width=64)
    whole = predict_logits(model, x, mode="whole")
    torch.testing.assert_close(predict_logits(model, x, mode="slide", crop=64, stride=32), whole)
    torch.testing.assert_close(predict_logits(model, x, mode="slide", crop=512, stride=341), whole)  # smaller: whole


def test_sliding_window_averages_overlapping_crops():
    model = randomise(tiny()).eval()
    x = images(1, 64, 96)
    with torch.no_grad():
        left, right = model(x[..., :64]), model(x[..., 32:])  # crops at x = 0 and 32 (flush with the edge)
    expected = torch.zeros(1, K, 64, 96)
    expected[..., :64] += left
    expected[..., 32:] += right
    expected[..., 32:64] /= 2
    torch.testing.assert_close(predict_logits(model, x, mode="slide", crop=64, stride=48), expected)


def test_flip_test_averages_the_probabilities_of_a_flipped_pass():
    model = randomise(tiny()).eval()
    x = images(height=64, width=96)
    with torch.no_grad():
        plain = model(x).softmax(1)
        flipped = model(x.flip(-1)).flip(-1).softmax(1)
    got = predict_logits(model, x, flip=True)
    torch.testing.assert_close(got, ((plain + flipped) / 2).log())
    torch.testing.assert_close(got.softmax(1), (plain + flipped) / 2)


def test_multi_scale_resizes_runs_resizes_back_and_averages():
    model = randomise(tiny()).eval()
    x = images(height=64, width=96)
    with torch.no_grad():
        full = model(x).softmax(1)
        small = model(F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False))
        small = F.interpolate(small, size=(64, 96), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(predict_logits(model, x, scales=(1.0, 0.5)), ((full + small) / 2).log())


# ------------------------------------------------------------------------------------------- weights
def _classification_checkpoint(tmp_path, name="lbvim_tiny_patch16_224", **kwargs):
    torch.manual_seed(7)
    model = timm.create_model(name, img_size=32, num_classes=10, **dict(TINY, **kwargs))
    randomise(model)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, path)
    return model, path


def test_rmsnorm_classification_checkpoint_loads_into_a_layernorm_backbone(tmp_path):
    source, path = _classification_checkpoint(tmp_path)  # RMSNorm, 2 x 2 patch grid, a 10-class head
    model = tiny(backbone_norm="layernorm")
    report = load_backbone_weights(model, path)
    assert report.kind == "backbone"
    assert report.zeroed_biases == [f"backbone.layers.{i}.norm.bias" for i in range(4)]
    assert report.missing_keys == [f"backbone.outnorm_{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(report.unexpected_keys) == ["head.bias", "head.weight", "norm_f.weight"]
    assert "pos_embed resized from [1, 4, 32] to [1, 16, 32]" in report.summary()
    for i in range(4):
        norm = model.backbone.model.layers[i].norm
        assert isinstance(norm, nn.LayerNorm)
        torch.testing.assert_close(norm.weight, source.layers[i].norm.weight)
        assert torch.equal(norm.bias, torch.zeros(32))
    torch.testing.assert_close(model.backbone.model.layers[2].mixer.A_log, source.layers[2].mixer.A_log)
    assert "backbone.layers.0.mixer.in_proj.weight" in report.loaded


def test_a_reference_vim_checkpoint_with_a_middle_class_token_loads_into_a_backbone_without_one(tmp_path):
    source, path = _classification_checkpoint(tmp_path, "vim_tiny_patch16_224")  # 4 patches + class token at 2
    # Vim's segmentation recipe: RMSNorm, no class token, fpn1..4, no per-output norms
    model = tiny("vim_tiny_patch16_224", img_size=32, neck="vim", backbone_norm="rmsnorm",
                 backbone_kwargs=dict(class_token=None))
    report = load_backbone_weights(model, path)
    assert "cls_token" in report.unexpected_keys and "index 2" in report.summary()
    pos = source.pos_embed
    torch.testing.assert_close(model.backbone.model.pos_embed, torch.cat([pos[:, :2], pos[:, 3:]], 1))
    assert not report.zeroed_biases
    assert report.missing_keys and all(k.startswith("backbone.fpn") for k in report.missing_keys)
    with torch.no_grad():
        assert model.eval()(images(1, 32, 32)).shape == (1, K, 32, 32)


def test_missing_backbone_tensors_are_an_error_naming_them(tmp_path):
    source, _ = _classification_checkpoint(tmp_path)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layers.1.mixer.x_proj")}
    with pytest.raises(CheckpointMismatchError, match="layers.1.mixer.x_proj.weight"):
        load_backbone_weights(tiny(), {"model": state})


def test_a_layernorm_checkpoint_into_an_rmsnorm_backbone_says_which_norm_to_use(tmp_path):
    _, path = _classification_checkpoint(tmp_path, norm_layer="layernorm")
    with pytest.raises(CheckpointMismatchError, match="backbone_norm='layernorm'"):
        load_backbone_weights(tiny(backbone_norm="rmsnorm"), path)


def test_a_checkpoint_of_another_width_is_a_mismatch_not_a_crash(tmp_path):
    _, path = _classification_checkpoint(tmp_path, embed_dim=48)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_backbone_weights(tiny(), path)


def test_with_strict_false_mis_shaped_tensors_are_skipped_and_reported(tmp_path):
    _, path = _classification_checkpoint(tmp_path, embed_dim=48)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone_weights(model, path, strict=False)
    skipped = [name for name, _, _ in report.mismatched_keys]
    assert "backbone.layers.0.mixer.in_proj.weight" in skipped and "mis-shaped tensors skipped" in report.summary()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every tensor was mis-shaped


# ------------------------------------------------------------------------------------------- timm models
def test_a_timm_vit_runs_through_the_adapter_with_residual_features():
    vit = dict(img_size=64, embed_dim=32, depth=4, num_heads=2)
    torch.manual_seed(0)
    model = build_segmentor("vit_tiny_patch16_224", K, feature_source="residual", backbone_kwargs=vit, **HEADS).eval()
    x = images()
    with torch.no_grad():
        assert model(x).shape == (2, K, 64, 64)
        want = model.backbone.model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        for i, (got, w) in enumerate(zip(model.backbone(x), want)):
            norm = getattr(model.backbone, f"outnorm_{i}")
            torch.testing.assert_close(got, norm(w.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    assert "backbone.blocks.0.attn.qkv.weight" in model.state_dict()
    with pytest.raises(ValueError, match="feature_source='mixer' needs a backbone that returns.*use feature_source"):
        build_segmentor("vit_tiny_patch16_224", K, feature_source="mixer", backbone_kwargs=vit, **HEADS)


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, message", [
    (dict(neck="fpn"), "neck must be one of"),
    (dict(feature_source="hidden"), "feature_source must be one of"),
    (dict(backbone_norm="batchnorm"), "backbone_norm must be one of"),
    (dict(out_indices=(0, 1, 2)), "out_indices must be 4 ints"),
    (dict(out_indices=(0, 1, 2, 4)), r"out_indices must lie in \[-4, 3\]"),
    (dict(out_indices=(0, 2, 1, 3)), "increasing order"),
    (dict(head_channels=0), "head_channels must be an int >= 1"),
    (dict(ignore_index=2), "ignore_index 2 is a class index"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
])
def test_bad_build_arguments_raise_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_an_unknown_backbone_name_is_named():
    with pytest.raises(ValueError, match="unknown backbone 'lbvim_tinny'"):
        build_segmentor("lbvim_tinny")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="sliding"), "mode must be one of"),
    (dict(mode="slide", crop=32, stride=48), "stride .* must not exceed crop"),
    (dict(crop=0), "crop must be an int >= 1"),
    (dict(scales=()), "scales must be a non-empty sequence"),
    (dict(scales=(1.0, -0.5)), "scales must be a non-empty sequence of positive numbers"),
    (dict(flip="yes"), "flip must be True or False"),
])
def test_bad_inference_arguments_raise_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        predict_logits(tiny().eval(), images(), **kwargs)


def test_inference_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match=r"eval mode \(model.eval\(\)\)"):
        predict_logits(tiny().train(), images())


def test_a_deep_copy_for_an_ema_is_independent_and_train_eval_reach_the_wrapped_backbone():
    model = tiny()
    ema = copy.deepcopy(model)
    assert ema.backbone.model.pos_embed is not model.backbone.model.pos_embed
    assert list(ema.state_dict()) == list(model.state_dict())
    ema.eval()
    assert not ema.backbone.model.training and model.backbone.model.training
    assert not any(m.training for m in ema.modules())


def test_bad_images_and_masks_raise_clear_messages():
    model = tiny()
    with pytest.raises(ValueError, match="images must have 3 channels"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="images must be a float tensor"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"mask values must be class indices 0..4 or the ignore index 255; found \[7"):
        model.losses(images(), torch.full((2, 64, 64), 7))
    with pytest.raises(ValueError, match="masks must be an integer tensor"):
        model.losses(images(), torch.zeros(2, 64, 64))
    with pytest.raises(TypeError, match="forward_intermediates"):
        BackboneAdapter(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="backbone must be a BackboneAdapter"):
        Segmentor(nn.Linear(2, 2), K)


@pytest.mark.parametrize("name, kwargs, source", backbone_params())
def test_the_other_vision_mambas_serve_as_segmentation_backbones(name, kwargs, source):
    torch.manual_seed(0)
    model = build_segmentor(name, 3, head_channels=8, aux_channels=8, feature_source=source,
                            backbone_kwargs=dict(kwargs, img_size=64))
    strides = model.backbone.out_strides
    assert len(strides) == 4 and (strides == [4, 8, 16, 32] if "vmamba" in name else len(set(strides)) == 1)
    images, masks = torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    losses = model.losses(images, masks)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.decode_head.conv_seg.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 3, 64, 96)
