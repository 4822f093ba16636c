"""VMamba / LB-VMamba: size, cross-scan routes, the SS2D mixer against a hand-written float64 computation,
the LB scan per route, checkpoints in the official layout, dense outputs and the full model at two sizes."""

import pytest
import timm
import torch
import torch.nn.functional as F

import lbmamba  # noqa: F401  (registers the models)
from lbmamba.models import load_checkpoint
from lbmamba.models.vmamba import VMamba, checkpoint_filter_fn
from lbmamba.nn.ss2d import SS2D, cross_merge, cross_scan, cross_scan_tables
from lbmamba.ops import resolve_window, selective_scan_fn, selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["vmamba_tiny_s1l8", "lb_vmamba_tiny_s1l8", "vmamba_small_s2l15", "lb_vmamba_small_s2l15"]
# a small VMamba: every stage present, few blocks, narrow
TINY = dict(depths=(1, 2, 1, 1), dims=8, num_classes=5, drop_path_rate=0.0)

# the official VMamba-T state dict: top-level keys, the keys of one block (stage 0) with the official shapes
TOP_LEVEL_KEYS = {
    "patch_embed.0.weight": (48, 3, 3, 3), "patch_embed.0.bias": (48,),
    "patch_embed.2.weight": (48,), "patch_embed.2.bias": (48,),
    "patch_embed.5.weight": (96, 48, 3, 3), "patch_embed.5.bias": (96,),
    "patch_embed.7.weight": (96,), "patch_embed.7.bias": (96,),
    "classifier.norm.weight": (768,), "classifier.norm.bias": (768,),
    "classifier.head.weight": (1000, 768), "classifier.head.bias": (1000,),
}
BLOCK_KEYS = {  # layers.0.blocks.{j}.
    "norm.weight": (96,), "norm.bias": (96,),
    "op.in_proj.weight": (96, 96),
    "op.conv2d.weight": (96, 1, 3, 3),
    "op.x_proj_weight": (4, 6 + 2, 96),
    "op.dt_projs_weight": (4, 96, 6),
    "op.dt_projs_bias": (4, 96),
    "op.A_logs": (384, 1),
    "op.Ds": (384,),
    "op.out_norm.weight": (96,), "op.out_norm.bias": (96,),
    "op.out_proj.weight": (96, 96),
    "norm2.weight": (96,), "norm2.bias": (96,),
    "mlp.fc1.weight": (384, 96), "mlp.fc1.bias": (384,),
    "mlp.fc2.weight": (96, 384), "mlp.fc2.bias": (96,),
}
DOWNSAMPLE_KEYS = ("downsample.1.weight", "downsample.1.bias", "downsample.3.weight", "downsample.3.bias")


def tiny(name="lb_vmamba_tiny_s1l8", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(TINY, **kwargs))


def randomise(module, seed=1, scale=0.1):
    """Perturb every parameter so equalities cannot hold by accident (norm weights 1, Ds 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def images(batch=2, height=32, width=32, chans=3, seed=0):
    return torch.randn(batch, chans, height, width, generator=torch.Generator().manual_seed(seed))


def official_state_dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), seed=0):
    """VMamba-T's state dict in the official layout (the shapes of BLOCK_KEYS scaled to each stage), random
    values."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(TOP_LEVEL_KEYS)
    for i, (depth, c) in enumerate(zip(depths, dims)):
        r = -(-c // 16)  # dt_rank
        block = {
            "norm.weight": (c,), "norm.bias": (c,), "op.in_proj.weight": (c, c), "op.conv2d.weight": (c, 1, 3, 3),
            "op.x_proj_weight": (4, r + 2, c), "op.dt_projs_weight": (4, c, r), "op.dt_projs_bias": (4, c),
            "op.A_logs": (4 * c, 1), "op.Ds": (4 * c,), "op.out_norm.weight": (c,), "op.out_norm.bias": (c,),
            "op.out_proj.weight": (c, c), "norm2.weight": (c,), "norm2.bias": (c,),
            "mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,), "mlp.fc2.weight": (c, 4 * c), "mlp.fc2.bias": (c,),
        }
        if i == 0:
            assert block == BLOCK_KEYS
        for j in range(depth):
            shapes.update({f"layers.{i}.blocks.{j}.{k}": s for k, s in block.items()})
        if i < len(depths) - 1:
            out = dims[i + 1]
            shapes.update({f"layers.{i}.downsample.1.weight": (out, c, 3, 3), f"layers.{i}.downsample.1.bias": (out,),
                           f"layers.{i}.downsample.3.weight": (out,), f"layers.{i}.downsample.3.bias": (out,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# ---------------------------------------------------------------------- registration and size
def test_original_and_lb_names_register_with_timm():
    assert set(NAMES) <= set(timm.list_models("*vmamba*"))
    assert timm.create_model("vmamba_tiny_s1l8", **TINY).window == 1
    assert timm.create_model("lb_vmamba_tiny_s1l8", **TINY).window == "auto"
    assert timm.create_model("vmamba_tiny_s1l8").pretrained_cfg["classifier"] == "classifier.head"


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "lb_vmamba_tiny_s1l8"])
def test_vmamba_tiny_has_the_counted_30_249_064_parameters(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == 30_249_064
    assert model.depths == [2, 2, 8, 2] and model.dims == [96, 192, 384, 768]


def test_vmamba_small_s2l15_configuration_and_size():
    model = timm.create_model("vmamba_small_s2l15")
    op = model.layers[0].blocks[0].op
    assert model.depths == [2, 2, 15, 2] and (op.d_inner, op.d_state, op.dt_rank) == (192, 1, 6)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 50


def test_official_state_dict_keys_and_shapes():
    model = timm.create_model("vmamba_tiny_s1l8")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in official_state_dict().items()}
    assert shapes == expected
    for key, shape in TOP_LEVEL_KEYS.items():
        assert shapes[key] == shape
    for key, shape in BLOCK_KEYS.items():
        assert shapes[f"layers.0.blocks.1.{key}"] == shape
    assert all(f"layers.2.{k}" in shapes for k in DOWNSAMPLE_KEYS)
    assert not any(k.startswith("layers.3.downsample") for k in shapes)


# ---------------------------------------------------------------------- cross-scan routes
def test_the_four_routes_on_a_2x3_map_written_out():
    order, inverse = cross_scan_tables(2, 3)
    # raster indices:  0 1 2
    #                  3 4 5
    assert order.tolist() == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major
        [5, 4, 3, 2, 1, 0],  # row-major reversed
        [5, 2, 4, 1, 3, 0],  # column-major reversed
    ]
    assert inverse[1].tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (4, 1), (3, 5), (7, 7), (6, 11), (14, 14)])
def test_each_route_and_its_inverse_compose_to_the_identity(size):
    height, width = size
    order, inverse = cross_scan_tables(height, width)
    identity = torch.arange(height * width).expand(4, -1)
    assert torch.equal(order.gather(1, inverse), identity)
    assert torch.equal(inverse.gather(1, order), identity)
    x = torch.randn(2, 3, height, width)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, height * width)
    torch.testing.assert_close(cross_merge(xs, height, width), 4 * x, rtol=0, atol=1e-6)
    # each route holds every token once, and undoing it alone gives the map back
    for k in range(4):
        single = torch.zeros_like(xs)
        single[:, k] = xs[:, k]
        torch.testing.assert_close(cross_merge(single, height, width), x, rtol=0, atol=0)


def test_route_tables_are_computed_once_per_size():
    assert cross_scan_tables(5, 6) is cross_scan_tables(5, 6)
    assert cross_scan_tables(5, 6) is not cross_scan_tables(6, 5)


# ---------------------------------------------------------------------- the mixer, against a hand-written computation
def route_positions(height, width):
    """The four routes as lists of (h, w), written with plain loops (independent of the module's tables)."""
    rows = [(h, w) for h in range(height) for w in range(width)]
    cols = [(h, w) for w in range(width) for h in range(height)]
    return [rows, cols, rows[::-1], cols[::-1]]


def ss2d_by_hand(op: SS2D, x: torch.Tensor, window) -> torch.Tensor:
    """SS2D v05_noz from its description, float64: one reference scan per route, explicit loops over routes
    and tokens for the reorder and the merge."""
    batch, _, height, width = x.shape
    D, N, R = op.d_inner, op.d_state, op.dt_rank
    L = height * width
    h = torch.einsum("oc,bchw->bohw", op.in_proj.weight, x)
    h = F.conv2d(h, op.conv2d.weight, None, padding=1, groups=D)
    h = h * torch.sigmoid(h)
    y = torch.zeros(batch, D, height, width, dtype=x.dtype)
    for k, positions in enumerate(route_positions(height, width)):
        u = torch.stack([h[:, :, i, j] for i, j in positions], dim=-1)  # (B, D, L)
        dbl = torch.einsum("cd,bdl->bcl", op.x_proj_weight[k], u)
        dt, Bk, Ck = dbl[:, :R], dbl[:, R:R + N], dbl[:, R + N:]
        delta = torch.einsum("dr,brl->bdl", op.dt_projs_weight[k], dt)
        rows = slice(k * D, (k + 1) * D)
        yk = selective_scan_ref(u, delta, -torch.exp(op.A_logs[rows]), Bk, Ck, op.Ds[rows],
                                delta_bias=op.dt_projs_bias[k], delta_softplus=True, window=resolve_window(window, L))
        for t, (i, j) in enumerate(positions):
            y[:, :, i, j] += yk[:, :, t]
    y = F.layer_norm(y.permute(0, 2, 3, 1), (D,), op.out_norm.weight, op.out_norm.bias, op.out_norm.eps)
    return torch.einsum("oc,bhwc->bohw", op.out_proj.weight, y)


@pytest.mark.parametrize("window", [1, "auto", 3], ids=["original", "lb-auto", "lb-3"])
@pytest.mark.parametrize("size", [(3, 5), (4, 4), (6, 3)])
def test_ss2d_equals_four_separate_float64_reference_scans(window, size):
    torch.manual_seed(0)
    op = randomise(SS2D(6, d_state=2, ssm_ratio=1.5, window=window)).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op(x), ss2d_by_hand(op, x, window), rtol=1e-9, atol=1e-10)


def test_one_grouped_lb_call_equals_one_call_per_route_with_windows_at_each_routes_position_0():
    g = torch.Generator().manual_seed(0)
    batch, K, D, N, L = 2, 4, 3, 2, 15  # L = 15: the last window of 4 is cut short
    u = torch.randn(batch, K * D, L, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, K * D, L, generator=g, dtype=torch.float64)
    A = -torch.rand(K * D, N, generator=g, dtype=torch.float64) - 0.5
    B = torch.randn(batch, K, N, L, generator=g, dtype=torch.float64)
    C = torch.randn(batch, K, N, L, generator=g, dtype=torch.float64)
    Dskip = torch.randn(K * D, generator=g, dtype=torch.float64)
    bias = torch.randn(K * D, generator=g, dtype=torch.float64)
    one = selective_scan_fn(u=u, delta=delta, A=A, B=B, C=C, D=Dskip, delta_bias=bias, delta_softplus=True, window=4)
    for k in range(K):
        rows = slice(k * D, (k + 1) * D)
        per_route = selective_scan_ref(u[:, rows], delta[:, rows], A[rows], B[:, k], C[:, k], Dskip[rows],
                                       delta_bias=bias[rows], delta_softplus=True, window=4)
        torch.testing.assert_close(one[:, rows], per_route, rtol=1e-10, atol=1e-12)
    vanilla = selective_scan_fn(u=u, delta=delta, A=A, B=B, C=C, D=Dskip, delta_bias=bias, delta_softplus=True,
                                window=1)
    assert (one - vanilla).abs().max() > 1e-3  # the windows matter


def test_ss2d_gradients_reach_every_parameter():
    op = randomise(SS2D(8, window="auto"))
    op(torch.randn(2, 8, 5, 7)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in op.parameters())


# ---------------------------------------------------------------------- the model
def test_lb_model_with_window_1_equals_the_original_with_the_same_weights():
    original = randomise(tiny("vmamba_tiny_s1l8")).eval()
    lb = tiny("lb_vmamba_tiny_s1l8", seed=3).eval()
    lb.load_state_dict(original.state_dict())
    x = images(height=40, width=24)
    with torch.no_grad():
        assert (lb(x) - original(x)).abs().max() > 1e-6  # window "auto" differs
        for module in lb.modules():
            if isinstance(module, SS2D):
                module.window = 1
        torch.testing.assert_close(lb(x), original(x), rtol=0, atol=0)
    built = tiny("lb_vmamba_tiny_s1l8", window=1).eval()
    built.load_state_dict(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(built(x), original(x), rtol=0, atol=0)


def test_a_block_is_pre_norm_residual_ss2d_then_mlp():
    model = randomise(tiny()).eval()
    block = model.layers[1].blocks[0]
    x = torch.randn(2, 16, 5, 3)
    with torch.no_grad():
        h = x + block.op(block.norm(x))
        n = F.layer_norm(h.permute(0, 2, 3, 1), (16,), block.norm2.weight, block.norm2.bias).permute(0, 3, 1, 2)
        m = torch.einsum("oc,bchw->bohw", block.mlp.fc1.weight, n) + block.mlp.fc1.bias[:, None, None]
        m = torch.einsum("oc,bchw->bohw", block.mlp.fc2.weight, F.gelu(m)) + block.mlp.fc2.bias[:, None, None]
        torch.testing.assert_close(block(x), h + m)


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "lb_vmamba_tiny_s1l8"])
@pytest.mark.parametrize("size", [(224, 224), (97, 130)])
def test_full_tiny_model_forward_and_backward(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name)
    x = torch.randn(1, 3, *size)
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_forward_intermediates_are_the_four_stage_maps_at_strides_4_8_16_32():
    model = randomise(tiny()).eval()
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == [8, 16, 32, 64]
    x = images(height=64, width=96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
        # the stage output is the blocks' output, before the downsample
        h = model.patch_embed(x)
        for stage, m in zip(model.layers, maps):
            h = stage.blocks(h)
            torch.testing.assert_close(m, h)
            h = stage.downsample(h)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_intermediates(x, norm=True)[1][-1], final)
        backbone = tiny(features_only=True, out_indices=(1, 3))
        backbone.model.load_state_dict(model.state_dict(), strict=False)  # (the pruned head is left out)
        feats = backbone.eval()(x)
        assert backbone.feature_info.reduction() == [8, 32]
        torch.testing.assert_close(feats[0], maps[1])
        torch.testing.assert_close(feats[1], maps[3])


def test_odd_and_small_inputs_run():
    model = tiny().eval()
    with torch.no_grad():
        for size in [(17, 33), (5, 5), (1, 1)]:
            assert model(images(1, *size)).shape == (1, 5)
            maps = model.forward_intermediates(images(1, *size), intermediates_only=True)
            assert maps[0].shape[-2:] == (-(-size[0] // 4), -(-size[1] // 4))


def test_training_engine_arguments_are_accepted():
    model = timm.create_model("lb_vmamba_tiny_s1l8", num_classes=10, in_chans=1, img_size=32, drop_path_rate=0.1,
                              depths=(1, 1, 1, 1), dims=8)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_grad_checkpointing_gives_the_same_gradients():
    x = images()
    grads = []
    for enable in (False, True):
        model = randomise(tiny())
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_no_weight_decay_and_group_matcher():
    model = tiny()
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith(("A_logs", "Ds")) for n in nwd)
    assert len(nwd) == 2 * sum(model.depths)
    from timm.models import group_parameters

    groups = list(group_parameters(model, model.group_matcher()).values())
    # the stem, one group per block (a stage's downsample joins its last block, the final norm the last
    # block), then the head
    assert len(groups) == 1 + sum(model.depths) + 1
    assert all(n.startswith("patch_embed.") for n in groups[0]) and groups[-1] == ["classifier.head.weight",
                                                                                 "classifier.head.bias"]
    assert "layers.0.downsample.1.weight" in groups[1] and "classifier.norm.weight" in groups[-2]


def test_prune_and_reset_classifier():
    model = tiny().eval()
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(images()).shape == (2, 64)
    model.reset_classifier(3, "")  # no pooling: a class map at stride 32
    with torch.no_grad():
        assert model(images()).shape == (2, 3, 1, 1)
    kept = model.prune_intermediate_layers([1])
    assert kept == [1] and len(model.layers) == 2
    with torch.no_grad():
        assert model.forward_intermediates(images(), intermediates_only=True)[-1].shape == (2, 16, 4, 4)


# ---------------------------------------------------------------------- checkpoints
def test_official_state_dict_loads_strictly_in_every_wrapper(tmp_path):
    sd = official_state_dict()
    wrapped = {
        "plain": sd,
        "model_and_ema": {"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()}, "epoch": 263,
                          "max_accuracy": 82.6},
        "state_dict": {"state_dict": sd},
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    for name in ("vmamba_tiny_s1l8", "lb_vmamba_tiny_s1l8"):
        model = timm.create_model(name)
        for label, checkpoint in wrapped.items():
            path = tmp_path / f"{label}.pth"
            torch.save(checkpoint, path)
            result = load_checkpoint(model, path, strict=True)
            assert result.ok, label
            loaded = model.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in sd.items()), label


def test_old_v0_key_names_and_1x1_conv_weights_are_accepted():
    model = randomise(tiny())
    sd = model.state_dict()
    old = {}
    for key, value in sd.items():
        key = key.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        key = key.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".blocks.0.op.", ".blocks.0.self_attention.")
        key = key.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        if value.dim() == 2 and (".in_proj." in key or ".out_proj." in key or ".fc1." in key):
            value = value[:, :, None, None]  # stored as a 1x1 conv
        old[key] = value
    assert "layers.0.blocks.0.ln_1.weight" in old and "layers.1.blocks.0.self_attention.A_logs" in old
    assert "norm.weight" in old and "head.weight" in old and "patch_embed.proj.weight" in old
    target = tiny(seed=5)
    assert load_checkpoint(target, {"model": old}, strict=True).ok
    assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())
    # a plain load_state_dict takes the 1x1 conv weights too, as VMamba's Linear2d does
    fresh = tiny(seed=6)
    fresh.load_state_dict(checkpoint_filter_fn({"model": old}, fresh) | {
        k: v[:, :, None, None] for k, v in sd.items() if k.endswith("op.in_proj.weight")})
    assert torch.equal(fresh.layers[0].blocks[0].op.in_proj.weight, sd["layers.0.blocks.0.op.in_proj.weight"])


def test_an_original_checkpoint_loads_into_the_lb_variant_and_runs(tmp_path):
    original = randomise(tiny("vmamba_tiny_s1l8"))
    torch.save({"model": original.state_dict()}, tmp_path / "ckpt.pth")
    lb = tiny("lb_vmamba_tiny_s1l8", seed=9)
    assert load_checkpoint(lb, tmp_path / "ckpt.pth").ok
    assert isinstance(lb, VMamba) and torch.isfinite(lb.eval()(images())).all()
