"""LocalVim (LocalMamba's plain model) and its LB version: sizes, names, scan layouts, the mixer against a
hand-written float64 re-computation, RoPE, the model's wiring, checkpoints and other input sizes."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import lbmamba
from lbmamba.models import CheckpointMismatchError, load_checkpoint
from lbmamba.models import localvim as lv
from lbmamba.nn import local_scan
from lbmamba.nn import multi_mamba as mm
from lbmamba.nn.multi_mamba import MultiMamba
from lbmamba.nn.rope import rope_tables, rotate_half
from lbmamba.ops import selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [
    "localvim_tiny", "lb_localvim_tiny",
    "localvim_tiny_middle_cls_token", "lb_localvim_tiny_middle_cls_token",
    "localvim_small", "lb_localvim_small",
]
# small shapes used for anything that runs: a 4 x 4 grid (w7 pads it to 7 x 7)
SMALL = dict(img_size=64, patch_size=16, embed_dim=16, depth=3, num_classes=7)


def small(name="lb_localvim_tiny", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SMALL, **kwargs))


def randomise(model, seed=1, scale=0.05):
    """Perturb every parameter so equalities cannot hold by accident (norm weights = 1, D = 1, zero biases...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def images(batch=2, size=64, width=None, seed=0):
    return torch.randn(batch, 3, size, width or size, generator=torch.Generator().manual_seed(seed))


def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ---------------------------------------------------------------------------------- names and sizes
def test_importing_lbmamba_registers_an_original_and_an_lb_name_per_model():
    assert set(NAMES) <= set(timm.list_models("*localvim*"))
    for name in NAMES:
        assert timm.models.model_entrypoint(name).__module__ == "lbmamba.models.localvim"
    assert lbmamba.load_checkpoint is load_checkpoint


def test_localvim_tiny_has_the_counted_7994152_parameters():
    with torch.device("meta"):
        for name in ("localvim_tiny", "lb_localvim_tiny"):
            assert sum(p.numel() for p in timm.create_model(name).parameters()) == 7_994_152
        # the class-token variant adds the token and its position-embedding entry
        cls = timm.create_model("localvim_tiny_middle_cls_token")
        assert sum(p.numel() for p in cls.parameters()) == 7_994_152 + 2 * 192
        # LocalVim-S ("28 M" in the paper)
        assert sum(p.numel() for p in timm.create_model("localvim_small").parameters()) == 27_783_784


def test_configurations_follow_the_official_definitions():
    with torch.device("meta"):
        tiny, lb_tiny = timm.create_model("localvim_tiny"), timm.create_model("lb_localvim_tiny")
        cls = timm.create_model("lb_localvim_tiny_middle_cls_token")
        small_model = timm.create_model("localvim_small")
    assert tiny.embed_dim == 192 and len(tiny.layers) == 20 and tiny.rope is not None and tiny.rope_residual
    assert [layer.mixer.directions for layer in tiny.layers] == list(lv.LOCALVIM_TINY_DIRECTIONS)
    assert tiny.layers[0].mixer.directions == ("h", "v_flip", "w7", "w7_flip")
    assert tiny.layers[19].mixer.directions == ("v", "v_flip", "w2", "w2_flip")
    assert all(layer.mixer.window == 1 for layer in tiny.layers)
    assert all(layer.mixer.window == "auto" for layer in lb_tiny.layers)
    assert tiny.global_pool == "mean" and cls.global_pool == "token"
    assert cls.rope is None and cls.class_token == "middle" and cls.layers[0].mixer.class_token
    # LocalVim-S: the second definition in the official file wins
    assert small_model.embed_dim == 384 and len(small_model.layers) == 20
    assert all(layer.mixer.directions == ("h", "h_flip", "w2", "w2_flip") for layer in small_model.layers)
    mixer = tiny.layers[0].mixer
    assert (mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv) == (384, 16, 12, 4)
    assert mixer.attn.global_reduce.out_features == 48


def test_state_dict_has_the_official_names_and_shapes():
    with torch.device("meta"):
        model = timm.create_model("localvim_tiny")
    sd = model.state_dict()
    top = {k for k in sd if not k.startswith("layers.")}
    assert top == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "rope.freqs_cos",
                   "rope.freqs_sin", "norm_f.weight", "head.weight", "head.bias"}
    block = {k[len("layers.0."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("layers.0.")}
    expected = {"norm.weight": (192,), "mixer.in_proj.weight": (768, 192), "mixer.out_proj.weight": (192, 384),
                "mixer.attn.norm.weight": (384,), "mixer.attn.norm.bias": (384,),
                "mixer.attn.global_reduce.weight": (48, 384), "mixer.attn.global_reduce.bias": (48,),
                "mixer.attn.channel_select.weight": (384, 48), "mixer.attn.channel_select.bias": (384,)}
    for k in range(4):
        expected.update({
            f"mixer.A_log_{k}": (384, 16), f"mixer.D_{k}": (384,),
            f"mixer.conv1d_{k}.weight": (384, 1, 4), f"mixer.conv1d_{k}.bias": (384,),
            f"mixer.x_proj_{k}.weight": (12 + 32, 384),
            f"mixer.dt_proj_{k}.weight": (384, 12), f"mixer.dt_proj_{k}.bias": (384,),
        })
    assert block == expected
    assert len(sd) == len(top) + 20 * len(expected)
    assert sd["pos_embed"].shape == (1, 196, 192)
    assert sd["rope.freqs_cos"].shape == sd["rope.freqs_sin"].shape == (196, 192)
    with torch.device("meta"):
        cls = timm.create_model("localvim_tiny_middle_cls_token")
    cls_top = {k for k in cls.state_dict() if not k.startswith("layers.")}
    assert cls_top == top - {"rope.freqs_cos", "rope.freqs_sin"} | {"cls_token"}
    assert cls.state_dict()["pos_embed"].shape == (1, 197, 192)


# ---------------------------------------------------------------------------------- scan layouts
def hand_order(direction, H, W):
    """The scan order written out with loops: raster indices, None at padded positions."""
    kind, K, flip = local_scan.parse_direction(direction)
    if kind == "h":
        seq = [h * W + w for h in range(H) for w in range(W)]
    elif kind == "v":
        seq = [h * W + w for w in range(W) for h in range(H)]
    else:
        Hg, Wg = math.ceil(H / K), math.ceil(W / K)
        seq = []
        for wh in range(Hg):
            for ww in range(Wg):
                for i in range(K):
                    for j in range(K):
                        h, w = wh * K + i, ww * K + j
                        seq.append(h * W + w if h < H and w < W else None)
    return seq[::-1] if flip else seq


GRIDS = [(14, 14), (4, 4), (1, 1), (5, 7), (7, 5), (3, 8), (11, 11), (15, 15), (9, 2), (2, 13)]
DIRS = local_scan.DIRECTIONS + ("w3", "w3_flip", "w1")


@pytest.mark.parametrize("H,W", GRIDS)
def test_every_direction_and_its_inverse_compose_to_the_identity(H, W):
    tokens = torch.arange(H * W)
    for d in DIRS:
        order, inv = local_scan.order(d, H, W), local_scan.inverse(d, H, W)
        assert order.tolist() == [H * W if p is None else p for p in hand_order(d, H, W)]
        padded = torch.cat([tokens, torch.tensor([-1])])
        assert torch.equal(padded[order][inv], tokens)  # scan, then put back: every token in place
        real = order < H * W
        assert sorted(order[real].tolist()) == list(range(H * W))  # each token read exactly once
    for class_token in (False, True):
        plan = local_scan.scan_plan(DIRS, H, W, class_token)
        seq = torch.cat([torch.arange(plan.num_tokens), torch.tensor([-1])])
        for group in plan.groups:
            for g, s in zip(group.gather, group.scatter):
                assert torch.equal(seq[g][s], seq[:-1])


def test_orders_written_out_on_small_grids():
    P = 9  # the padding index of a 3 x 3 grid
    assert local_scan.order("v", 2, 3).tolist() == [0, 3, 1, 4, 2, 5]
    assert local_scan.order("h_flip", 2, 3).tolist() == [5, 4, 3, 2, 1, 0]
    assert local_scan.order("w2", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    # 3 x 3 padded to 4 x 4 at the bottom and the right; the flip reverses the padded sequence
    assert local_scan.order("w2", 3, 3).tolist() == [0, 1, 3, 4, 2, P, 5, P, 6, 7, P, P, 8, P, P, P]
    assert local_scan.order("w2_flip", 3, 3).tolist() == [P, P, P, 8, P, P, 7, 6, P, 5, P, 2, 4, 3, 1, 0]
    assert local_scan.inverse("v", 2, 3).tolist() == [0, 2, 4, 1, 3, 5]


def test_middle_class_token_sits_at_the_same_index_of_every_directions_sequence():
    H, W = 3, 3  # 9 patches, class token at 4 of 10 tokens; w2 pads to 16 (+ the token: 17)
    plan = local_scan.scan_plan(("h", "v_flip", "w2", "w2_flip"), H, W, class_token=True)
    assert sorted(plan.seqlens()) == [10, 10, 17, 17] and len(plan.groups) == 2
    for group in plan.groups:
        assert (group.gather[:, 4] == 4).all() and (group.scatter[:, 4] == 4).all()
    by_dir = {d: (g.gather[j], g.scatter[j]) for g in plan.groups for j, d in
              ((j, plan.directions[i]) for j, i in enumerate(g.indices))}
    # w2 of the patches [0, 1, 3, 4, 2, P, 5, P, ...] as token indices (patch p >= 4 -> token p + 1), the
    # class token inserted at index 4, the zero token at 10
    assert by_dir["w2"][0].tolist() == [0, 1, 3, 5, 4, 2, 10, 6, 10, 7, 8, 10, 10, 9, 10, 10, 10]


def test_official_v_reverse_is_the_inverse_only_on_square_grids():
    for d in ("v", "v_flip"):
        assert torch.equal(local_scan.inverse(d, 5, 5, "official"), local_scan.inverse(d, 5, 5))
        assert not torch.equal(local_scan.inverse(d, 2, 3, "official"), local_scan.inverse(d, 2, 3))
    # the reference's reverse of v: view the sequence as (H, W) and transpose it
    seq = local_scan.order("v", 2, 3)  # tokens 0..5 in column-major order: [0, 3, 1, 4, 2, 5]
    back = seq[local_scan.inverse("v", 2, 3, "official")]
    assert back.tolist() == seq.view(2, 3).t().reshape(-1).tolist() == [0, 4, 3, 2, 1, 5]
    with pytest.raises(ValueError, match="v_reverse"):
        local_scan.inverse("v", 2, 3, "transpose")


def test_bad_direction_names_are_refused():
    for bad in ("d", "w0", "h_flipped", "w", "", 3):
        with pytest.raises(ValueError, match="scan direction"):
            local_scan.parse_direction(bad)
    with pytest.raises(ValueError, match="unknown scan direction 'x'"):
        small(directions=[("h", "x")])
    with pytest.raises(ValueError, match="list of names"):
        small(directions=["h", ["v"]])


# ---------------------------------------------------------------------------------- the mixer
def auto_window(L):
    return 4 if L <= 128 else 8 if L <= 256 else 16


def reference_mixer(m, hidden, grid, class_token, window):
    """MultiMamba written from its description, direction by direction, in float64 with the sequential
    reference scan and the window chosen here from each direction's own sequence length."""
    H, W = grid
    D, dc = m.d_inner, m.d_conv
    hidden = hidden.double()
    batch = hidden.shape[0]
    xz = hidden @ m.in_proj.weight.double().T
    if class_token:
        c = (xz.shape[1] - 1) // 2
        cls, patches = xz[:, c], torch.cat([xz[:, :c], xz[:, c + 1:]], dim=1)
    else:
        patches = xz
    total = 0
    for k, direction in enumerate(m.directions):
        order = hand_order(direction, H, W)
        zero = torch.zeros(batch, 2 * D, dtype=torch.float64)
        seq = torch.stack([zero if p is None else patches[:, p] for p in order], dim=1)
        if class_token:
            seq = torch.cat([seq[:, :c], cls[:, None], seq[:, c:]], dim=1)
        L = seq.shape[1]
        x, z = seq[..., :D].transpose(1, 2), seq[..., D:].transpose(1, 2)
        conv = getattr(m, f"conv1d_{k}")
        xc = conv.bias.double()[None, :, None].expand(batch, D, L).clone()
        for t in range(L):
            for j in range(dc):
                s = t - (dc - 1) + j
                if s >= 0:
                    xc[:, :, t] += conv.weight.double()[:, 0, j] * x[:, :, s]
        xc = F.silu(xc)
        x_dbl = xc.transpose(1, 2) @ getattr(m, f"x_proj_{k}").weight.double().T
        dt, Bm, Cm = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt_proj = getattr(m, f"dt_proj_{k}")
        delta = (dt @ dt_proj.weight.double().T).transpose(1, 2)
        y = selective_scan_ref(
            xc, delta, -torch.exp(getattr(m, f"A_log_{k}").double()), Bm.transpose(1, 2), Cm.transpose(1, 2),
            getattr(m, f"D_{k}").double(), z, dt_proj.bias.double(), True,
            window=auto_window(L) if window == "auto" else window,
        )
        if class_token:
            y_cls, y = y[..., c], torch.cat([y[..., :c], y[..., c + 1:]], dim=-1)
        out = torch.zeros(batch, D, H * W, dtype=torch.float64)
        for pos, p in enumerate(order):
            if p is not None:
                out[..., p] = y[..., pos]
        if class_token:
            out = torch.cat([out[..., :c], y_cls[..., None], out[..., c:]], dim=-1)
        out = out.transpose(1, 2)
        gate = m.attn
        g = F.layer_norm(out, (D,), gate.norm.weight.double(), gate.norm.bias.double(), 1e-5).mean(1, keepdim=True)
        g = F.gelu(g @ gate.global_reduce.weight.double().T + gate.global_reduce.bias.double())
        g = torch.sigmoid(g @ gate.channel_select.weight.double().T + gate.channel_select.bias.double())
        total = total + out * g
    return total @ m.out_proj.weight.double().T


MIXER_CASES = [
    # 11 x 11: h / v read 121 tokens (W 4), w2 reads 12 x 12 = 144 (W 8), w7 reads 14 x 14 = 196 (W 8)
    ((11, 11), ("h", "v_flip", "w7", "w2_flip")),
    # non-square, with padding and the exact v inverse
    ((5, 7), ("v", "w2", "w3_flip", "h_flip")),
]


@pytest.mark.parametrize("window", [1, "auto", 3])
@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("grid,directions", MIXER_CASES)
def test_mixer_equals_a_hand_written_float64_recomputation(grid, directions, class_token, window):
    torch.manual_seed(0)
    m = randomise(MultiMamba(8, directions, d_state=4, window=window, class_token=class_token), scale=0.2).double()
    L = grid[0] * grid[1] + int(class_token)
    x = torch.randn(2, L, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid), reference_mixer(m, x, grid, class_token, window), rtol=1e-9, atol=1e-10)


def test_directions_of_equal_length_share_one_scan_call(monkeypatch):
    calls = []
    real = mm.selective_scan_fn

    def counting(u, *args, **kwargs):
        calls.append(tuple(u.shape))
        return real(u, *args, **kwargs)

    monkeypatch.setattr(mm, "selective_scan_fn", counting)
    torch.manual_seed(0)
    m = MultiMamba(8, ("h", "v_flip", "w7", "w7_flip"), d_state=4)
    x = torch.randn(2, 196, 8)
    m(x, (14, 14)).sum().backward()  # 14 x 14 needs no padding: one call for the four directions
    assert calls == [(2, 4 * 16, 196)]
    calls.clear()
    m(torch.randn(2, 121, 8), (11, 11))  # w7 pads 11 x 11 to 196: two calls
    assert sorted(calls) == [(2, 2 * 16, 121), (2, 2 * 16, 196)]
    assert m.plan((11, 11)).seqlens() == [121, 121, 196, 196]


def test_mixer_gradients_match_the_float64_recomputation():
    torch.manual_seed(0)
    m = randomise(MultiMamba(8, ("h", "w2_flip", "v", "w3"), d_state=4), scale=0.2).double()
    x = torch.randn(2, 5 * 6, 8, dtype=torch.float64, requires_grad=True)
    out = m(x, (5, 6))
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x] + list(m.parameters()))
    ref = reference_mixer(m, x, (5, 6), False, "auto")
    ref_grads = torch.autograd.grad((ref * w).sum(), [x] + list(m.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_cpu_causal_convolution_equals_conv1d():
    x, w, b = torch.randn(2, 6, 9), torch.randn(6, 1, 4), torch.randn(6)
    torch.testing.assert_close(mm.causal_depthwise_conv1d(x, w, b), F.conv1d(x, w, b, padding=3, groups=6)[..., :9])


# ---------------------------------------------------------------------------------- RoPE and the model's wiring
def test_rope_tables_rotate_channel_pairs_by_row_then_column_angles():
    cos, sin = rope_tables(192, (14, 14))
    assert cos.shape == sin.shape == (196, 192)
    h, w, i = 3, 11, 5
    f = 10000 ** (-2 * i / 96)
    for channel, pos in ((2 * i, h), (2 * i + 1, h), (96 + 2 * i, w), (96 + 2 * i + 1, w)):
        assert math.isclose(cos[h * 14 + w, channel].item(), math.cos(pos * f), abs_tol=1e-6)
        assert math.isclose(sin[h * 14 + w, channel].item(), math.sin(pos * f), abs_tol=1e-6)
    # positions are scaled to span 14 steps whatever the grid: a 7 x 7 grid steps by 2
    cos7, _ = rope_tables(192, (7, 7))
    assert math.isclose(cos7[1 * 7, 0].item(), math.cos(2.0), abs_tol=1e-6)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rotate_half(x).tolist() == [-2.0, 1.0, -4.0, 3.0]


def test_model_equals_hand_written_layers_with_rope_before_every_layer():
    model = randomise(small(window=2)).eval()
    x = images()
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        cos, sin = model.rope.freqs_cos, model.rope.freqs_sin
        rope = lambda t: t * cos + rotate_half(t) * sin
        hidden, residual = tokens, None
        for layer in model.layers:
            hidden = rope(hidden)
            residual = hidden if residual is None else rope(residual) + hidden
            hidden = layer.mixer(rms(residual, layer.norm.weight), (4, 4))
        features = rms(residual + hidden, model.norm_f.weight)
        torch.testing.assert_close(model.forward_features(x), features)
        torch.testing.assert_close(model(x), model.head(features.mean(1)))
        assert torch.equal(cos, rope_tables(16, (4, 4))[0])


def test_middle_class_token_model_pools_its_class_token():
    model = randomise(small("lb_localvim_tiny_middle_cls_token")).eval()
    x = images()
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        seq = torch.cat([tokens[:, :8], model.cls_token.expand(2, -1, -1), tokens[:, 8:]], dim=1) + model.pos_embed
        hidden, residual = seq, None
        for layer in model.layers:
            hidden, residual = layer(hidden, residual, (4, 4))
        features = rms(residual + hidden, model.norm_f.weight)
        torch.testing.assert_close(model.forward_features(x), features)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, 8])
        inter = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        assert inter[0][0].shape == (2, 16, 16) and inter[0][1].shape == (2, 1, 16)
    with pytest.raises(ValueError, match="rope"):
        small("localvim_tiny", class_token="middle")


def test_forward_intermediates_give_the_residual_stream_or_the_mixer_output():
    model = randomise(small()).eval()
    x = images()
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        h0, r0 = model.layers[0](model.rope(tokens), None, (4, 4))
        mixer = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, source="mixer")
        residual = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(mixer[0], h0)
        torch.testing.assert_close(residual[0], r0 + h0)
        maps = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        torch.testing.assert_close(maps[0], (r0 + h0).reshape(2, 4, 4, 16).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="does not apply to source='mixer'"):
        model.forward_intermediates(x, source="mixer", norm=True)


def test_window_1_lb_model_equals_the_original_with_the_same_weights():
    for lb_name, name in (("lb_localvim_tiny", "localvim_tiny"),
                          ("lb_localvim_tiny_middle_cls_token", "localvim_tiny_middle_cls_token")):
        original = randomise(small(name), scale=0.3).eval()  # large enough B / C that the scans matter
        lb1 = small(lb_name, seed=5, window=1).eval()
        lb1.load_state_dict(original.state_dict())
        lb = small(lb_name, seed=5).eval()
        lb.load_state_dict(original.state_dict())
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(lb1(x), original(x), rtol=0, atol=0)
            assert not torch.allclose(lb(x), original(x), rtol=1e-3, atol=1e-3)


def test_initialisation_follows_the_official_code():
    model = small("localvim_tiny", depth=4)
    mixer = model.layers[0].mixer
    for k in range(4):
        assert torch.equal(getattr(mixer, f"dt_proj_{k}").bias, torch.zeros(32))  # zeroed by the model's init
        assert getattr(mixer, f"dt_proj_{k}").weight.std() < 0.05
        assert torch.allclose(getattr(mixer, f"A_log_{k}"), torch.log(torch.arange(1, 17.0)).expand(32, 16))
        assert torch.equal(getattr(mixer, f"D_{k}"), torch.ones(32))
    assert torch.equal(mixer.attn.norm.weight, torch.ones(32)) and torch.equal(mixer.attn.global_reduce.bias,
                                                                               torch.zeros(4))
    bound = 1 / math.sqrt(32) / math.sqrt(4)  # kaiming-uniform(a=sqrt 5) / sqrt(depth)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert {"pos_embed", "layers.0.mixer.A_log_0", "layers.0.mixer.D_3"} <= model.no_weight_decay()
    cls = small("localvim_tiny_middle_cls_token")
    assert torch.equal(cls.cls_token, torch.zeros(1, 1, 16))


def test_per_layer_directions_cycle_and_one_list_serves_every_layer():
    model = small(depth=4, directions=[("h", "v"), ("w2", "w2_flip", "h")])
    assert [layer.mixer.directions for layer in model.layers] == [("h", "v"), ("w2", "w2_flip", "h")] * 2
    model = small(depth=2, directions=("h", "w3"))
    assert [layer.mixer.directions for layer in model.layers] == [("h", "w3")] * 2
    assert "layers.1.mixer.A_log_1" in model.state_dict() and "layers.1.mixer.A_log_2" not in model.state_dict()


# ---------------------------------------------------------------------------------- other sizes
def test_any_input_size_runs_and_non_square_inputs_use_the_exact_v_inverse():
    model = randomise(small(directions=[("h", "v", "v_flip", "w7_flip")])).eval()
    official = small(directions=[("h", "v", "v_flip", "w7_flip")], v_reverse="official").eval()
    official.load_state_dict(model.state_dict())
    with torch.no_grad():
        square = images(size=80)
        torch.testing.assert_close(official(square), model(square), rtol=0, atol=0)
        odd = images(size=70, width=100)  # padded to 80 x 112: a 5 x 7 grid
        out = model.forward_intermediates(odd, intermediates_only=True)
        assert out[0].shape == (2, 16, 5, 7) and torch.isfinite(model(odd)).all()
        assert not torch.allclose(official(odd), model(odd))


def test_checkpoint_at_another_grid_equals_running_the_original_on_larger_images():
    source = randomise(small()).eval()
    target = small(img_size=96).eval()  # 6 x 6 grid: pos_embed and RoPE tables resized bicubically
    load_checkpoint(target, {"model": source.state_dict()}, strict=True)
    assert target.pos_embed.shape == (1, 36, 16) and target.rope.freqs_cos.shape == (36, 16)
    x = images(size=96)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    cls_source = randomise(small("localvim_tiny_middle_cls_token")).eval()
    cls_target = small("localvim_tiny_middle_cls_token", img_size=96).eval()
    load_checkpoint(cls_target, cls_source.state_dict())
    assert torch.equal(cls_target.pos_embed[:, 18], cls_source.pos_embed[:, 8])  # the class token's entry kept
    with torch.no_grad():
        torch.testing.assert_close(cls_target(x), cls_source(x))


# ---------------------------------------------------------------------------------- checkpoints
def official_state_dict(model, seed=3):
    """A state dict with exactly the official key set and shapes (random values)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_official_checkpoints_load_strictly_also_inside_their_wrappers(tmp_path):
    model = small("lb_localvim_tiny")
    sd = official_state_dict(model)
    expected_top = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "rope.freqs_cos",
                    "rope.freqs_sin", "norm_f.weight", "head.weight", "head.bias"}
    assert {k for k in sd if not k.startswith("layers.")} == expected_top
    wrappers = {
        "plain": sd,
        # the official training checkpoint (CheckpointManager): weights under 'model', next to the EMA and
        # optimizer states
        "training": {"epoch": 299, "model": sd, "ema_model": None, "optimizer": {"state": {}, "param_groups": []}},
        # tools/convert_ckpt.py: {'state_dict': ckpt[key]}; an EMA converted this way carries module.module.
        "converted": {"state_dict": {f"module.module.{k}": v for k, v in sd.items()}},
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    for i, (kind, ckpt) in enumerate(wrappers.items()):
        path = tmp_path / f"{kind}.pth"
        torch.save(ckpt, path)
        target = small("localvim_tiny", seed=i + 10)
        result = lbmamba.load_checkpoint(target, path, strict=True)
        assert result.ok, kind
        for k, v in sd.items():
            assert torch.equal(target.state_dict()[k], v), (kind, k)


def test_a_checkpoint_of_another_model_is_refused_with_the_keys_listed():
    sd = official_state_dict(small("localvim_tiny"))
    sd.pop("layers.0.mixer.A_log_3")
    with pytest.raises(CheckpointMismatchError, match="A_log_3"):
        load_checkpoint(small("localvim_tiny"), sd)
    with pytest.raises(CheckpointMismatchError, match="cls_token"):
        load_checkpoint(small("localvim_tiny"), dict(official_state_dict(small("localvim_tiny")),
                                                     cls_token=torch.zeros(1, 1, 16)))


def test_missing_rope_tables_are_filled_in_from_the_model():
    model = small()
    sd = {k: v for k, v in official_state_dict(model).items() if not k.startswith("rope.")}
    load_checkpoint(model, sd)
    assert torch.equal(model.rope.freqs_cos, rope_tables(16, (4, 4))[0])


# ---------------------------------------------------------------------------------- full size, training
@pytest.mark.parametrize("size", [224, (160, 200)])
def test_lb_localvim_tiny_forward_and_backward(size):
    torch.manual_seed(0)
    model = timm.create_model("lb_localvim_tiny", num_classes=10)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, 3, h, w)
    out = model(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomise(small())
    x = images()
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_engine_constructor_arguments_are_accepted():
    model = timm.create_model("lb_localvim_tiny", num_classes=10, in_chans=1, img_size=32, drop_path_rate=0.1,
                              embed_dim=16, depth=3, patch_size=4)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # the official schedule: layer i gets ([0] + linspace(0, rate, depth))[i], the final add the rate itself
    assert isinstance(model.layers[1].drop_path, torch.nn.Identity)
    assert model.layers[2].drop_path.drop_prob == pytest.approx(0.05) and model.drop_path.drop_prob == 0.1


def test_plans_moved_to_a_device_under_inference_mode_are_normal_tensors():
    """A layer's plan moved to its device on a first call under torch.inference_mode() is cached: it must not
    be an inference tensor, or later training steps could not index with it ("meta" stands in for a GPU)."""
    m = MultiMamba(8, ("h", "w2_flip"), d_state=4)
    with torch.inference_mode():
        plan = m.plan((5, 5), "meta")
    tables = [t for group in plan.groups for t in (group.gather, group.scatter)]
    assert tables and all(t.device.type == "meta" and not t.is_inference() for t in tables)
