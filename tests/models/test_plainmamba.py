"""PlainMamba / LB-PlainMamba: sizes, the zig-zag scan tables, the mixer against a float64 re-computation,
the official quirks, the official checkpoint layout, and forward / backward at several sizes."""

import pytest
import timm
import torch
import torch.nn.functional as F

import lbmamba
import lbmamba.nn.plain_mamba as plain_mamba_module
from lbmamba.models import CheckpointMismatchError
from lbmamba.models.plainmamba import ConvPatchEmbed, PlainMamba
from lbmamba.nn.plain_mamba import PlainMamba2D
from lbmamba.nn.zigzag_scan import zigzag_tables
from lbmamba.ops import selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["plainmamba_l1", "plainmamba_l2", "plainmamba_l3", "lb_plainmamba_l1", "lb_plainmamba_l2",
         "lb_plainmamba_l3"]
TINY = dict(img_size=32, embed_dim=16, depth=2, num_classes=5)
SIZES = [(1, 1), (1, 5), (5, 1), (2, 2), (3, 4), (4, 3), (2, 3), (7, 3), (5, 5), (13, 14), (14, 14)]


def tiny(name="plainmamba_l1", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(TINY, **kwargs))


def randomise(module, seed=1, scale=0.05):
    """Perturb every parameter so that equalities cannot hold by accident (LN weight 1, D 1, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def images(batch=2, size=32, chans=3, seed=0):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, chans, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- registry and sizes
def test_all_six_names_register_with_timm():
    assert set(NAMES) <= set(timm.list_models("*plainmamba*"))


def test_plainmamba_l1_has_7551656_parameters_with_the_1000_class_head_and_7358656_without():
    with torch.device("meta"):
        model = timm.create_model("plainmamba_l1")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert total == 7_551_656
    assert total - head == 7_358_656


@pytest.mark.parametrize("name,millions", [("plainmamba_l2", 25.7), ("plainmamba_l3", 50.5)])
def test_l2_and_l3_backbones_match_the_published_sizes(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    # the README's "25.7 M" / "50.5 M" (the doc's sizes) are the backbone counts 25,760,832 / 50,507,456, cut
    # to one decimal
    assert abs(backbone / 1e6 - millions) < 0.1


@pytest.mark.parametrize("arch", ["l1", "l2", "l3"])
def test_lb_variants_have_exactly_the_original_parameters(arch):
    with torch.device("meta"):
        a, b = timm.create_model(f"plainmamba_{arch}"), timm.create_model(f"lb_plainmamba_{arch}")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.window == 1 and b.window == "auto"
    assert all(layer.mamba.window == "auto" for layer in b.layers)


def test_only_l1_has_the_dw_block_and_only_after_layer_0():
    with torch.device("meta"):
        l1, l2 = timm.create_model("plainmamba_l1"), timm.create_model("plainmamba_l2")
    assert [i for i, layer in enumerate(l1.layers) if layer.dw is not None] == [0]
    assert all(layer.dw is None for layer in l2.layers)


# ---------------------------------------------------------------------------------- zig-zag tables
# 3 x 4 grid, raster indices:   0  1  2  3
#                               4  5  6  7
#                               8  9 10 11
# labels: 0 start, 1 right, 2 left, 3 up, 4 down (the move that reached the token)
GRID_3x4 = {
    "orders": [
        [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],  # rows snaking from the top-left
        [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],  # rows snaking upward (H odd: from the bottom-right)
        [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],  # columns snaking from the top-left
        [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0],  # columns snaking leftward (W even: from the top-right)
    ],
    "labels": [
        [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1],
        [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2],
        [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3],
        [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3],
    ],
}
# 2 x 3 grid:   0 1 2
#               3 4 5
GRID_2x3 = {
    "orders": [
        [0, 1, 2, 5, 4, 3],
        [3, 4, 5, 2, 1, 0],  # H even: from the bottom-left
        [0, 3, 4, 1, 2, 5],
        [5, 2, 1, 4, 3, 0],  # W odd: from the bottom-right
    ],
    "labels": [
        [0, 1, 1, 4, 2, 2],
        [0, 1, 1, 3, 2, 2],
        [0, 4, 1, 3, 1, 4],
        [0, 3, 2, 4, 2, 3],
    ],
}


@pytest.mark.parametrize("shape,expected", [((3, 4), GRID_3x4), ((2, 3), GRID_2x3)])
def test_zigzag_orders_and_direction_labels_on_small_grids_written_out_by_hand(shape, expected):
    tables = zigzag_tables(*shape)
    assert tables.orders.tolist() == expected["orders"]
    assert tables.labels.tolist() == expected["labels"]


def _walk(height, width):
    """The four orders and labels, walked token by token as the official code describes them."""

    def snake(outer, inner, start_forward, cell, forward_move, backward_move, outer_move):
        order, labels, forward = [], [], start_forward
        for o in outer:
            seq = inner if forward else inner[::-1]
            for i_i, i in enumerate(seq):
                order.append(cell(o, i))
                labels.append(0 if not order[:-1] else (outer_move if i_i == 0 else
                                                        (forward_move if forward else backward_move)))
            forward = not forward
        return order, labels

    rows, cols = list(range(height)), list(range(width))
    o0 = snake(rows, cols, True, lambda r, c: r * width + c, 1, 2, 4)
    # order 1 starts where order 0 ended: bottom-left for even H, bottom-right for odd H
    o1 = snake(rows[::-1], cols, height % 2 == 0, lambda r, c: r * width + c, 1, 2, 3)
    o2 = snake(cols, rows, True, lambda c, r: r * width + c, 4, 3, 1)
    o3 = snake(cols[::-1], rows, width % 2 == 0, lambda c, r: r * width + c, 4, 3, 2)
    return [o[0] for o in (o0, o1, o2, o3)], [o[1] for o in (o0, o1, o2, o3)]


@pytest.mark.parametrize("shape", SIZES)
def test_zigzag_tables_match_a_token_by_token_walk(shape):
    orders, labels = _walk(*shape)
    tables = zigzag_tables(*shape)
    assert tables.orders.tolist() == orders
    assert tables.labels.tolist() == labels


@pytest.mark.parametrize("shape", SIZES)
def test_every_zigzag_order_and_its_inverse_compose_to_the_identity(shape):
    height, width = shape
    length = height * width
    tables = zigzag_tables(height, width)
    identity = torch.arange(length)
    x = torch.randn(3, length)
    for k in range(4):
        order, inverse = tables.orders[k], tables.inverse[k]
        assert sorted(order.tolist()) == list(range(length))  # a permutation
        assert torch.equal(order[inverse], identity) and torch.equal(inverse[order], identity)
        assert torch.equal(x[:, order][:, inverse], x) and torch.equal(x[:, inverse][:, order], x)
        rows, cols = order // width, order % width
        steps = (rows.diff().abs() + cols.diff().abs()).tolist()
        assert all(s == 1 for s in steps)  # continuous: every step moves to a neighbouring token
    assert torch.equal(tables.orders[1], tables.orders[0].flip(0))
    assert torch.equal(tables.orders[3], tables.orders[2].flip(0))


def test_zigzag_tables_are_built_once_per_size_and_device():
    assert zigzag_tables(6, 7) is zigzag_tables(6, 7)
    assert zigzag_tables(6, 7).orders.device.type == "cpu"
    with pytest.raises(ValueError, match="at least 1 x 1"):
        zigzag_tables(0, 3)


# ---------------------------------------------------------------------------------- the mixer, in float64
def reference_mixer(mixer: PlainMamba2D, x: torch.Tensor, hw, window, reorder_only_u, dt_bias_twice):
    """PlainMamba's mixer re-computed from its description, in float64: four separate scans with the float64
    reference, one direction at a time, each output put back token by token."""
    height, width = hw
    p = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    x = x.double()
    batch, length, _ = x.shape
    e, n, r = mixer.d_inner, mixer.d_state, mixer.dt_rank
    xz = x @ p["in_proj.weight"].T + p["in_proj.bias"]
    xs, z = xz[..., :e], xz[..., e:]
    grid = xs.permute(0, 2, 1).reshape(batch, e, height, width)
    xs = F.silu(F.conv2d(grid, p["conv2d.weight"], p["conv2d.bias"], padding=mixer.conv_size // 2, groups=e))
    xs = xs.reshape(batch, e, length)  # raster order
    x_dbl = xs.transpose(1, 2) @ p["x_proj.weight"].T
    dt, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    delta = dt @ p["dt_proj.weight"].T
    if dt_bias_twice:
        delta = delta + p["dt_proj.bias"]
    delta, B, C = delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
    A = -torch.exp(p["A_log"])
    orders, labels = _walk(height, width)
    y = torch.zeros(batch, e, length, dtype=torch.float64)
    for order, label in zip(orders, labels):
        direction_B = torch.stack([p["direction_Bs"][lab] for lab in label], dim=1)  # (N, L), by scan position
        u = xs[:, :, order]
        if reorder_only_u:
            d_k, B_k, C_k = delta, B + direction_B, C
        else:
            d_k, B_k, C_k = delta[:, :, order], B[:, :, order] + direction_B, C[:, :, order]
        y_k = selective_scan_ref(u, d_k, A, B_k, C_k, p["D"], None, p["dt_proj.bias"], True, window=window)
        for t, token in enumerate(order):
            y[:, :, token] += y_k[:, :, t]
    y = y.transpose(1, 2) * F.silu(z)
    return y @ p["out_proj.weight"].T + p["out_proj.bias"]


@pytest.mark.parametrize("window", [1, 4, "auto"])
@pytest.mark.parametrize("quirks", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("hw", [(3, 5), (4, 4)])
def test_mixer_equals_four_separate_float64_reference_scans(window, quirks, hw):
    reorder_only_u, dt_bias_twice = quirks
    torch.manual_seed(0)
    mixer = PlainMamba2D(8, d_state=4, conv_size=3, window=window, reorder_only_u=reorder_only_u,
                         dt_bias_twice=dt_bias_twice)
    randomise(mixer, scale=0.2).double()
    x = torch.randn(2, hw[0] * hw[1], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = reference_mixer(mixer, x, hw, window, reorder_only_u, dt_bias_twice)
    torch.testing.assert_close(mixer(x, hw), expected, rtol=1e-10, atol=1e-10)


def test_mixer_runs_its_four_scans_as_one_op_call_stacked_on_the_batch_axis(monkeypatch):
    calls = []
    real = plain_mamba_module.selective_scan_fn

    def counting(u, *args, **kwargs):
        calls.append((tuple(u.shape), kwargs.get("window")))
        return real(u, *args, **kwargs)

    monkeypatch.setattr(plain_mamba_module, "selective_scan_fn", counting)
    mixer = PlainMamba2D(8, d_state=4, window="auto")
    mixer(torch.randn(3, 12, 8), (3, 4))
    assert calls == [((3 * 4, 16, 12), "auto")]


def test_the_official_quirks_change_the_output_and_are_on_by_default():
    torch.manual_seed(0)
    default = randomise(PlainMamba2D(8, d_state=4), scale=0.5)
    assert default.reorder_only_u and default.dt_bias_twice
    x = torch.randn(2, 12, 8)
    out = default(x, (3, 4))
    for kwargs in (dict(reorder_only_u=False), dict(dt_bias_twice=False)):
        other = PlainMamba2D(8, d_state=4, **kwargs)
        other.load_state_dict(default.state_dict())
        assert (other(x, (3, 4)) - out).norm() > 1e-2 * out.norm(), kwargs


def test_dt_bias_applied_twice_equals_the_doubled_bias_applied_once():
    torch.manual_seed(0)
    twice = randomise(PlainMamba2D(8, d_state=4, dt_bias_twice=True)).double()
    once = PlainMamba2D(8, d_state=4, dt_bias_twice=False).double()
    once.load_state_dict(twice.state_dict())
    with torch.no_grad():
        once.dt_proj.bias.mul_(2)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(once(x, (3, 4)), twice(x, (3, 4)), rtol=1e-12, atol=1e-12)


def test_official_quirks_false_turns_both_quirks_off_and_each_can_be_set_alone():
    model = tiny(official_quirks=False)
    assert all(not (l.mamba.reorder_only_u or l.mamba.dt_bias_twice) for l in model.layers)
    model = tiny(dt_bias_twice=False)
    assert all(l.mamba.reorder_only_u and not l.mamba.dt_bias_twice for l in model.layers)


# ---------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("official_quirks", [True, False])
def test_lb_model_with_window_1_equals_the_original_with_the_same_weights(official_quirks):
    kwargs = dict(img_size=64, official_quirks=official_quirks)
    original = randomise(tiny("plainmamba_l1", **kwargs), scale=0.3).eval()
    lb = tiny("lb_plainmamba_l1", seed=5, window=1, **kwargs).eval()
    lb.load_state_dict(original.state_dict())
    x = images(size=64)
    with torch.no_grad():
        out = original(x)
        torch.testing.assert_close(lb(x), out, rtol=0, atol=0)
        lb_auto = tiny("lb_plainmamba_l1", **kwargs).eval()
        lb_auto.load_state_dict(original.state_dict())
        assert (lb_auto(x) - out).norm() > 1e-3 * out.norm()


@pytest.mark.parametrize("name", ["plainmamba_l1", "lb_plainmamba_l1"])
@pytest.mark.parametrize("size", [224, (72, 100)])
def test_tiny_model_forward_and_backward_at_224_px_and_another_size(name, size):
    model = tiny(name, img_size=224, depth=2)
    x = images(size=size)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("size,grid", [(224, (14, 14)), (225, (15, 15)), ((32, 50), (2, 4)), (17, (2, 2))])
def test_patch_embed_pads_the_stem_output_to_whole_patches(size, grid):
    embed = ConvPatchEmbed(in_chans=3, embed_dim=8)
    assert embed.grid_size(size) == grid
    tokens, out_grid = embed(images(1, size))
    assert out_grid == grid and tokens.shape == (1, grid[0] * grid[1], 8)


def test_forward_intermediates_are_nchw_in_image_order():
    model = tiny(depth=3).eval()
    x = images(size=(48, 32))
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, norm=True)
        tokens = model.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 3, 2)] * 3
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(feats[-1].flatten(2).transpose(1, 2), tokens)


def test_engine_style_construction_with_one_channel_and_drop_path():
    model = timm.create_model("lb_plainmamba_l1", num_classes=10, in_chans=1, img_size=32, drop_path_rate=0.1,
                              embed_dim=16, depth=2)
    assert model(images(2, 32, chans=1)).shape == (2, 10)
    assert "layers.0.mamba.direction_Bs" in model.no_weight_decay()


# ---------------------------------------------------------------------------------- the official checkpoint layout
def official_l1_keys():
    """The key set of an official PlainMamba-L1 mmcls checkpoint (ImageClassifier: backbone + head)."""
    keys = {"backbone.pos_embed", "backbone.patch_embed.projection.weight", "backbone.patch_embed.projection.bias",
            "backbone.ln1.weight", "backbone.ln1.bias", "head.fc.weight", "head.fc.bias"}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys |= {"backbone.patch_embed.stem.0.weight"} | {f"backbone.patch_embed.stem.1.{s}" for s in bn}
    keys |= {"backbone.patch_embed.convs.0.weight"} | {f"backbone.patch_embed.convs.1.{s}" for s in bn}
    keys |= {"backbone.layers.0.dw.0.weight"} | {f"backbone.layers.0.dw.1.{s}" for s in bn}
    for i in range(24):
        keys |= {f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.norm.bias"}
        keys |= {f"backbone.layers.{i}.mamba.{s}" for s in (
            "A_log", "D", "direction_Bs", "in_proj.weight", "in_proj.bias", "conv2d.weight", "conv2d.bias",
            "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight", "out_proj.bias")}
    return keys


@pytest.fixture(scope="module")
def official_l1_state_dict():
    torch.manual_seed(0)
    model = randomise(timm.create_model("plainmamba_l1"), scale=0.01)
    return {("head." + k[5:] if k.startswith("head.") else "backbone." + k): v for k, v in model.state_dict().items()}


def test_the_model_has_the_official_key_set_and_shapes_without_the_backbone_prefix(official_l1_state_dict):
    assert set(official_l1_state_dict) == official_l1_keys()
    shapes = {k: tuple(v.shape) for k, v in official_l1_state_dict.items()}
    assert shapes["backbone.layers.3.mamba.direction_Bs"] == (5, 16)
    assert shapes["backbone.layers.3.mamba.conv2d.weight"] == (384, 1, 7, 7)
    assert shapes["backbone.layers.3.mamba.x_proj.weight"] == (12 + 32, 384)
    assert shapes["backbone.patch_embed.projection.weight"] == (192, 64, 8, 8)
    assert shapes["backbone.pos_embed"] == (1, 196, 192)


@pytest.mark.parametrize("wrapper", ["state_dict", "state_dict+ema", "plain", "model"])
def test_an_official_checkpoint_loads_strictly_through_load_checkpoint(official_l1_state_dict, wrapper, tmp_path):
    sd = dict(official_l1_state_dict)
    if wrapper == "state_dict+ema":  # the EMA hook of the L2 / L3 recipes registers buffers on the classifier
        sd["ema_backbone_pos_embed"] = sd["backbone.pos_embed"].clone()
    checkpoint = {"plain": sd, "model": {"model": sd}}.get(wrapper, {"meta": {"epoch": 300, "CLASSES": ("a", "b")},
                                                                   "state_dict": sd})
    path = tmp_path / "l1.pth"
    torch.save(checkpoint, path)
    model = timm.create_model("lb_plainmamba_l1")
    result = lbmamba.load_checkpoint(model, path, strict=True)
    assert result.ok
    for key, value in model.state_dict().items():
        official = "head." + key[5:] if key.startswith("head.") else "backbone." + key
        assert torch.equal(value, official_l1_state_dict[official]), key


def test_a_checkpoint_missing_a_key_is_refused(official_l1_state_dict):
    sd = dict(official_l1_state_dict)
    del sd["backbone.layers.5.mamba.direction_Bs"]
    with pytest.raises(CheckpointMismatchError, match="direction_Bs"):
        lbmamba.load_checkpoint(timm.create_model("plainmamba_l1"), {"state_dict": sd})


def test_loading_at_another_image_size_resizes_pos_embed_as_mmcls_does(official_l1_state_dict):
    model = timm.create_model("plainmamba_l1", img_size=256)
    lbmamba.load_checkpoint(model, {"state_dict": official_l1_state_dict})
    src = official_l1_state_dict["backbone.pos_embed"].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(src, size=(16, 16), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_running_at_another_size_resamples_pos_embed_on_the_fly():
    model = randomise(tiny(img_size=32)).eval()
    other = tiny(img_size=48).eval()
    lbmamba.load_checkpoint(other, model.state_dict())
    x = images(size=48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x))
    assert isinstance(model, PlainMamba)


def test_works_as_a_segmentation_backbone_through_the_shared_adapter():
    from lbmamba.models import build_segmentor

    seg = build_segmentor("lb_plainmamba_l1", num_classes=4, feature_source="residual", head_channels=16,
                          aux_channels=8, backbone_kwargs=dict(img_size=64, embed_dim=16, depth=4))
    x = images(size=(64, 96))
    assert seg(x).shape == (2, 4, 64, 96)
    seg.losses(x, torch.randint(0, 4, (2, 64, 96)))["loss"].backward()
    assert seg.backbone.removed_keys == {"ln1.weight", "ln1.bias"}  # the classifier head is pruned away
