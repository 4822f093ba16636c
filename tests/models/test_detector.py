"""Mask R-CNN / Cascade Mask R-CNN: feature pyramids, the cascade's per-stage matching, coding and loss
weights, training losses and eval outputs in torchvision's format."""

import math

import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from conftest import backbone_params
from lbmamba.models.dense import (
    CASCADE_BOX_STDS,
    CASCADE_IOU_THRESHOLDS,
    CASCADE_STAGE_WEIGHTS,
    CascadeRoIHeads,
    DetectionBackbone,
    Detector,
    HierarchicalFeaturePyramid,
    SimpleFeaturePyramid,
    build_detector,
    stds_to_weights,
)

K = 3  # classes
TINY = dict(embed_dim=32, depth=4, patch_size=16)
SMALL_HEADS = dict(out_channels=32, head_conv_channels=16, head_fc_channels=64)
STRIDES = (4, 8, 16, 32, 64)
NAMES = ["0", "1", "2", "3", "pool"]


def tiny(name="lbvim_tiny_patch16_224", kind="cascade_mask_rcnn", seed=0, backbone_kwargs=None, **kwargs):
    torch.manual_seed(seed)
    return build_detector(name, K, kind=kind, img_size=128, backbone_kwargs=dict(TINY, **(backbone_kwargs or {})),
                          **dict(SMALL_HEADS, **kwargs))


def images(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def targets(n=2, size=128):
    out = []
    for i in range(n):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 50.0], [30.0 + i, 60.0, 100.0, 120.0]])
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        out.append(dict(boxes=boxes, labels=torch.tensor([1, K]), masks=masks))
    return out


# ------------------------------------------------------------------------------------------- pyramids
@pytest.mark.parametrize("name", ["lbvim_tiny_patch16_224", "vim_tiny_patch16_224", "uvim_tiny_patch16_224"])
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_simple_pyramid_gives_five_256_channel_maps_at_strides_4_to_64(name, size):
    torch.manual_seed(0)
    model = build_detector(name, K, img_size=128, backbone_kwargs=TINY)
    assert isinstance(model.backbone.fpn, SimpleFeaturePyramid)
    with torch.no_grad():
        feats = model.backbone.eval()(torch.randn(1, 3, *size))
    assert list(feats) == NAMES
    for stride, f in zip(STRIDES, feats.values()):
        assert f.shape == (1, 256, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_simple_pyramid_follows_vitdets_simple_fpn_branches():
    fpn = SimpleFeaturePyramid(192, 16, 256)
    up4, up2, same, down = fpn.branches
    assert [type(m) for m in up4] == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert (up4[0].in_channels, up4[0].out_channels, up4[3].out_channels) == (192, 96, 48)
    assert up4[0].kernel_size == (2, 2) and up4[0].stride == (2, 2)
    assert isinstance(up2, nn.ConvTranspose2d) and up2.out_channels == 96
    assert isinstance(same, nn.Identity) and isinstance(down, nn.MaxPool2d)
    assert fpn.branch_channels == [48, 96, 192, 192]  # LBMamba's SimpleFPN in_channels
    for lateral, output in zip(fpn.lateral_convs, fpn.output_convs):
        assert lateral[0].kernel_size == (1, 1) and output[0].kernel_size == (3, 3)
        assert lateral[0].bias is None and isinstance(lateral[1], LayerNorm2d) and len(output) == 2
        assert output[0].out_channels == 256
    x = torch.randn(1, 192, 4, 4)
    feats = fpn(x)
    torch.testing.assert_close(feats["pool"], feats["3"][..., ::2, ::2])  # max-pool k1 s2 of the last level


def test_a_patch_8_backbone_gives_the_same_strides():
    model = tiny(backbone_kwargs=dict(patch_size=8))
    with torch.no_grad():
        feats = model.backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_backbone_map_is_the_last_layers_mixer_output_in_image_order_through_outnorm_0():
    model = tiny().eval()
    body = model.backbone.body
    assert body.out_indices == (3,) and body.feature_source == "mixer"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = body.model.forward_intermediates(x, indices=[3], norm=False, output_fmt="NCHW",
                                                intermediates_only=True, source="mixer")[0]
        want = body.outnorm_0(want.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(body(x)[0], want)
    assert body.model.class_token is None  # LBMamba's detection backbone: if_cls_token=False


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_vmamba_pyramid_is_built_from_its_four_stages(size):
    torch.manual_seed(0)
    model = build_detector("vmamba_tiny_s1l8", K, backbone_kwargs=dict(depths=(1, 1, 1, 1), dims=8),
                           **SMALL_HEADS)
    assert isinstance(model.backbone.fpn, HierarchicalFeaturePyramid)
    assert model.backbone.fpn.in_channels == [8, 16, 32, 64]
    assert model.backbone.feature_source == "residual"
    with torch.no_grad():
        feats = model.backbone.eval()(torch.randn(1, 3, *size))
    for stride, f in zip(STRIDES, feats.values()):
        assert f.shape == (1, 32, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


@pytest.mark.parametrize("name, kwargs, source", backbone_params())
def test_the_other_vision_mambas_serve_as_detection_backbones(name, kwargs, source):
    torch.manual_seed(0)
    model = build_detector(name, K, img_size=128, feature_source=source, backbone_kwargs=dict(kwargs, img_size=128),
                           rois_per_image=32, **SMALL_HEADS)
    staged = "vmamba" in name
    assert isinstance(model.backbone.fpn, HierarchicalFeaturePyramid if staged else SimpleFeaturePyramid)
    assert model.backbone.feature_source == source
    losses = model(images(), targets())
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("backbone.body.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the backbone learns through the pyramid
    model.eval()
    with torch.no_grad():
        out = model(images(1))[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}


def test_fixed_size_input_is_normalised_and_padded_but_not_resized():
    model = tiny().eval()
    batch, _ = model.transform([torch.rand(3, 128, 128), torch.rand(3, 100, 90)])
    assert batch.image_sizes == [(128, 128), (100, 90)] and batch.tensors.shape[-2:] == (128, 128)
    resizing = tiny(min_size=64, max_size=64).eval()
    batch, _ = resizing.transform([torch.rand(3, 128, 128)])
    assert batch.image_sizes == [(64, 64)]


# ------------------------------------------------------------------------------------------- training / eval
@pytest.mark.parametrize("kind,stages", [("cascade_mask_rcnn", 3), ("mask_rcnn", 1)])
def test_training_gives_a_finite_loss_dict_per_stage_and_backward_reaches_every_head(kind, stages):
    model = tiny(kind=kind).train()
    assert isinstance(model, Detector) and len(model.roi_heads.stages) == stages
    losses = model(images(), targets())
    want = {"loss_objectness", "loss_rpn_box_reg"}
    for i in range(stages):
        want |= {f"loss_classifier_s{i}", f"loss_box_reg_s{i}", f"loss_mask_s{i}"}
    assert set(losses) == want
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for i, stage in enumerate(model.roi_heads.stages):
        for part in (stage.box_head, stage.box_predictor, stage.mask_head, stage.mask_predictor):
            assert all(p.grad is not None for p in part.parameters()), (i, type(part).__name__)
    assert model.backbone.body.model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("kind", ["cascade_mask_rcnn", "mask_rcnn"])
def test_eval_gives_boxes_labels_scores_and_image_sized_masks(kind):
    model = tiny(kind=kind).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128), torch.rand(3, 96, 128)])
    assert len(out) == 2
    for det, (h, w) in zip(out, [(128, 128), (96, 128)]):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        n = det["boxes"].shape[0]
        assert 0 < n <= 100 and det["boxes"].shape == (n, 4)
        assert det["labels"].shape == det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, h, w)
        assert ((det["labels"] >= 1) & (det["labels"] <= K)).all()
        assert ((det["scores"] >= 0.05) & (det["scores"] <= 1)).all()
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()


def test_training_without_targets_or_with_images_without_objects():
    model = tiny().train()
    with pytest.raises(ValueError, match="targets"):
        model.roi_heads({}, [torch.zeros(0, 4)], [(128, 128)], None)
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                 masks=torch.zeros(0, 128, 128, dtype=torch.uint8))
    losses = model(images(), [empty, targets(1)[0]])
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_and_eval_run_under_autocast_with_float32_losses_and_boxes():
    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images(), targets())
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        with torch.no_grad():
            out = model.eval()(images(1))[0]
    assert out["boxes"].dtype == out["scores"].dtype == out["masks"].dtype == torch.float32


def test_eval_with_no_detections_gives_empty_outputs():
    model = tiny(box_score_thresh=1.0).eval()
    with torch.no_grad():
        out = model(images(1))[0]
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == out["scores"].shape == (0,)
    assert out["masks"].shape == (0, 1, 128, 128)


def test_a_box_only_detector_has_no_mask_heads_or_mask_losses():
    model = tiny(with_mask=False).train()
    t = [{k: v for k, v in d.items() if k != "masks"} for d in targets()]
    losses = model(images(), t)
    assert not any("mask" in k for k in losses)
    assert not any(hasattr(s, "mask_head") for s in model.roi_heads.stages)
    with torch.no_grad():
        assert "masks" not in model.eval()(images(1))[0]


@pytest.mark.parametrize("change,message", [
    (dict(labels=torch.tensor([0, 1])), r"labels must lie in 1\.\.3"),
    (dict(labels=torch.tensor([1, K + 1])), r"labels must lie in 1\.\.3"),
    (dict(labels=torch.tensor([1.0, 2.0])), "int64"),
    (dict(boxes=torch.tensor([1.0, 2.0, 3.0, 4.0])), r"boxes must be a float tensor \(N, 4\)"),
    (dict(masks=torch.zeros(1, 128, 128, dtype=torch.uint8)), "one mask per box"),
])
def test_bad_targets_are_one_line_errors_not_crashes_in_a_loss(change, message):
    model = tiny().train()
    bad = dict(targets(1)[0], **change)
    with pytest.raises(ValueError, match=message):
        model.roi_heads({}, [torch.zeros(0, 4)], [(128, 128)], [bad])


# ------------------------------------------------------------------------------------------- the cascade
def test_stages_default_to_lbmambas_iou_thresholds_loss_weights_and_stds():
    heads = tiny().roi_heads
    assert isinstance(heads, CascadeRoIHeads)
    assert tuple(s.iou_threshold for s in heads.stages) == CASCADE_IOU_THRESHOLDS == (0.5, 0.6, 0.7)
    assert heads.stage_loss_weights == CASCADE_STAGE_WEIGHTS == (1.0, 0.5, 0.25)
    assert tuple(s.box_stds for s in heads.stages) == CASCADE_BOX_STDS
    coder_weights = [(10, 10, 5, 5), (20, 20, 10, 10), (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067)]
    for stage, weights in zip(heads.stages, coder_weights):
        assert stage.box_coder.weights == pytest.approx(weights)
        assert stage.fg_bg_sampler.batch_size_per_image == 512
        assert stage.fg_bg_sampler.positive_fraction == 0.25
        assert stage.box_predictor.bbox_pred.out_features == (K + 1) * 4  # class-specific
    assert heads.box_coder is heads.stages[-1].box_coder
    assert stds_to_weights((0.1, 0.1, 0.2, 0.2)) == pytest.approx((10, 10, 5, 5))


def test_each_stage_matches_proposals_at_its_own_iou_threshold():
    heads = tiny().roi_heads
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU with the ground truth = width / 100
    widths = [45.0, 55.0, 59.0, 65.0, 69.0, 75.0, 100.0]
    proposals = torch.tensor([[0.0, 0.0, 100.0, w] for w in widths])
    for stage, threshold in zip(heads.stages, (0.5, 0.6, 0.7)):
        _, labels = stage.match(proposals, gt, torch.tensor([2]))
        want = [2 if w / 100 >= threshold else 0 for w in widths]
        assert labels.tolist() == want, threshold


def test_each_stage_encodes_targets_with_its_own_stds():
    heads = tiny().roi_heads
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 0.0, 11.0, 20.0]])  # dx = 0.1, dy = 0.5, dw = 0, dh = log 2
    raw = torch.tensor([0.1, 0.5, 0.0, math.log(2)])
    for stage, stds in zip(heads.stages, CASCADE_BOX_STDS):
        got = stage.box_coder.encode_single(gt, proposal)[0]
        torch.testing.assert_close(got, raw / torch.tensor(stds))
        # the stage's sampler path encodes with the same coder (the gt itself is added as a proposal)
        sampled = heads.sample(stage, [proposal], [dict(boxes=gt, labels=torch.tensor([1]))])
        is_gt = sampled["is_gt"][0]
        torch.testing.assert_close(sampled["targets"][0][is_gt], torch.zeros(1, 4))
        if stage.iou_threshold <= 0.5:  # IoU of the proposal with the gt is exactly 0.5
            torch.testing.assert_close(sampled["targets"][0][~is_gt], (raw / torch.tensor(stds))[None])


def test_stage_loss_weights_multiply_each_stages_losses():
    weighted = tiny(seed=0).train()
    unit = tiny(seed=0, stage_loss_weights=(1.0, 1.0, 1.0)).train()
    unit.load_state_dict(weighted.state_dict())
    torch.manual_seed(5)
    a = weighted(images(), targets())
    torch.manual_seed(5)
    b = unit(images(), targets())
    for i, w in enumerate((1.0, 0.5, 0.25)):
        for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
            torch.testing.assert_close(a[f"{name}_s{i}"], w * b[f"{name}_s{i}"])
    torch.testing.assert_close(a["loss_objectness"], b["loss_objectness"])


def test_refinement_decodes_each_rois_class_deltas_detached_and_clipped():
    heads = tiny().roi_heads
    stage = heads.stages[0]
    rois = [torch.tensor([[10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 10.0, 10.0]])]
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [9.0, 0.0, 0.0, 3.0]], requires_grad=True)  # bg row -> argmax fg 3
    deltas = torch.zeros(2, K + 1, 4)
    deltas[0, 2, 0] = 1.0  # class 2 (the label given): shift x by 0.1 * width = 1
    deltas[1, 3, 0] = -1.0  # class 3 (argmax foreground of a background RoI): shift x by -1, clipped at 0
    out = heads.refine(stage, rois, [torch.tensor([2, 0])], logits, deltas.reshape(2, -1).requires_grad_(),
                       [(100, 100)])[0]
    torch.testing.assert_close(out, torch.tensor([[11.0, 10.0, 21.0, 20.0], [0.0, 0.0, 9.0, 10.0]]))
    assert not out.requires_grad


class _Const(nn.Module):
    def __init__(self, *outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        n = x.shape[0]
        outs = [o.expand(n, *o.shape[1:]) for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def test_test_time_scores_average_the_stages_logits_and_masks_average_their_sigmoids():
    model = tiny().eval()
    heads = model.roi_heads
    stage_logits = [torch.tensor([[0.0, 2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.0, 3.0, 0.0]]),
                    torch.tensor([[0.0, 1.0, 1.0, 3.5]])]
    mask_logits = [-1.0, 0.5, 2.0]
    for stage, cl, ml in zip(heads.stages, stage_logits, mask_logits):
        stage.box_predictor = _Const(cl, torch.zeros(1, (K + 1) * 4))
        stage.mask_predictor = _Const(torch.full((1, K + 1, 28, 28), ml))
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 128))
        out = heads(feats, [torch.tensor([[20.0, 20.0, 80.0, 90.0]])], [(128, 128)])[0][0]
    probs = torch.stack(stage_logits).mean(0).softmax(-1)[0]
    want = sorted(((float(probs[c]), c) for c in range(1, K + 1)), reverse=True)
    assert out["labels"].tolist() == [c for _, c in want]
    torch.testing.assert_close(out["scores"], torch.tensor([s for s, _ in want]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[20.0, 20.0, 80.0, 90.0]] * K))
    torch.testing.assert_close(out["masks"], torch.full((K, 1, 28, 28), sum(torch.sigmoid(torch.tensor(v))
                                                                              for v in mask_logits).item() / 3))


# ------------------------------------------------------------------------------------------- arguments
def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny(kind="retinanet")
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(iou_thresholds=(0.5, 0.6))
    with pytest.raises(ValueError, match="one stage"):
        tiny(kind="mask_rcnn", iou_thresholds=(0.5, 0.6), stage_loss_weights=(1, 1), box_stds=CASCADE_BOX_STDS[:2])
    with pytest.raises(ValueError, match="both min_size and max_size"):
        tiny(min_size=64)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_detector("no_such_model", K)
    with pytest.raises(ValueError, match="stride"):
        SimpleFeaturePyramid(32, 12)
    with pytest.raises(TypeError, match="forward_intermediates|feature_info"):
        DetectionBackbone(nn.Linear(2, 2))
