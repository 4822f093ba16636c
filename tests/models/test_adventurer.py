"""Adventurer / LB-Adventurer: sizes, official names, the Mamba-2 mixer against independent float64
re-computations (a chunked SSD and a head-wise LB loop), the block's semantics, checkpoints."""

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import lbmamba.models.adventurer  # noqa: F401  (registers the models)
from lbmamba.models import CheckpointMismatchError, load_checkpoint, read_file
from lbmamba.models.adventurer import flip_patch_tokens, layer_flips
from lbmamba.nn.mamba2 import Mamba2, gated_rms_norm
from lbmamba.ops import resolve_window, selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224", "adventurer_small_patch16_224",
         "lb_adventurer_small_patch16_224"]

# small shapes for anything that runs: 4 heads of 8 channels, N 8
SMALL = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, d_state=8, headdim=8, num_classes=10)


def small(name="lb_adventurer_tiny_patch16_224", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SMALL, **kwargs))


def randomise(module, seed=1, scale=0.05):
    """Perturb every parameter so equalities cannot hold by accident (norm weights = 1, D = 1...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def images(batch=2, size=32, chans=3, seed=0):
    if isinstance(size, int):
        size = (size, size)
    return torch.randn(batch, chans, *size, generator=torch.Generator().manual_seed(seed))


def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ---------------------------------------------------------------------------------- sizes and names
def test_models_register_with_timm():
    assert set(NAMES) <= set(timm.list_models("*adventurer*"))


def test_adventurer_tiny_has_11_608_840_parameters():
    for name in ("adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224"):
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == 11_608_840


def architecture_count(dim, depth=12, N=64, headdim=64, classes=1000, patches=196):
    """Parameters of the official architecture, counted from its description."""
    d_inner, heads = 2 * dim, 2 * dim // headdim
    hidden = int(2.5 * dim)
    mixer = dim * (2 * d_inner + 2 * N + heads) + (d_inner + 2 * N) * 5 + 3 * heads + d_inner + d_inner * dim
    mlp = 2 * (dim * hidden + hidden) + hidden * dim + dim
    block = mixer + mlp + 2 * dim
    return depth * block + (3 * 256 * dim + dim) + dim + (patches + 1) * dim + dim + dim * classes + classes


def test_parameter_counts_follow_the_architecture():
    assert architecture_count(256) == 11_608_840
    with torch.device("meta"):
        small_model = timm.create_model("adventurer_small_patch16_224")
    count = sum(p.numel() for p in small_model.parameters())
    assert count == architecture_count(512) == 44_491_816  # "44.5 M"


def official_keys(depth=12):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm_f.weight",
            "head.weight", "head.bias"}
    for i in range(depth):
        keys |= {f"layers.{i}.{k}" for k in (
            "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight",
            "mixer.conv1d.bias", "mixer.norm.weight", "mixer.out_proj.weight", "norm.weight",
            "mlp.w1.weight", "mlp.w1.bias", "mlp.w2.weight", "mlp.w2.bias", "mlp.w3.weight", "mlp.w3.bias",
            "norm_mlp.weight")}
    return keys


@pytest.mark.parametrize("name", ["adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224"])
def test_state_dict_has_the_official_names_and_shapes(name):
    with torch.device("meta"):
        sd = timm.create_model(name).state_dict()
    assert set(sd) == official_keys()
    shapes = {
        "cls_token": (1, 1, 256), "pos_embed": (1, 197, 256), "patch_embed.proj.weight": (256, 3, 16, 16),
        "layers.0.mixer.in_proj.weight": (2 * 512 + 2 * 64 + 8, 256),  # [z, x, B, C, dt]
        "layers.0.mixer.conv1d.weight": (512 + 128, 1, 4), "layers.0.mixer.conv1d.bias": (640,),
        "layers.0.mixer.dt_bias": (8,), "layers.0.mixer.A_log": (8,), "layers.0.mixer.D": (8,),
        "layers.0.mixer.norm.weight": (512,), "layers.0.mixer.out_proj.weight": (256, 512),
        "layers.0.mlp.w1.weight": (640, 256), "layers.0.mlp.w3.weight": (256, 640), "head.weight": (1000, 256),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_configurations_and_pretrained_cfg():
    with torch.device("meta"):
        orig = timm.create_model("adventurer_tiny_patch16_224")
        lb = timm.create_model("lb_adventurer_tiny_patch16_224")
    assert all(layer.mixer.window == 1 for layer in orig.layers)
    assert all(layer.mixer.window == "auto" for layer in lb.layers)
    for model in (orig, lb):
        assert model.flip_schedule == "released" and model.global_pool == "token"
        mixer = model.layers[0].mixer
        assert (mixer.d_state, mixer.headdim, mixer.nheads, mixer.ngroups, mixer.d_conv) == (64, 64, 8, 1, 4)
        assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head"
        assert cfg["first_conv"] == "patch_embed.proj"
    assert orig.pretrained_cfg["architecture"] == "adventurer_tiny_patch16_224"


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = timm.create_model("adventurer_tiny_patch16_224")
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert abs(model.head.weight.std().item() - 0.02) < 0.002 and model.head.bias.abs().max() == 0
    bound = 1 / math.sqrt(512) / math.sqrt(12)  # kaiming-uniform(a=sqrt 5), then / sqrt(depth)
    for layer in model.layers:
        mixer = layer.mixer
        w = mixer.out_proj.weight
        assert bound * 0.9 < w.abs().max() <= bound
        A = torch.exp(mixer.A_log)
        assert A.min() >= 1 and A.max() <= 16  # A_init_range (1, 16), per head
        dt = F.softplus(mixer.dt_bias)
        assert dt.min() >= 0.000999 and dt.max() <= 0.1001  # log-uniform in [dt_min, dt_max]
        assert torch.equal(mixer.D, torch.ones(8)) and torch.equal(mixer.norm.weight, torch.ones(512))
        for lin in (layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
            assert lin.bias.abs().max() == 0
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.D",
            "layers.0.mixer.dt_bias"} <= model.no_weight_decay()


# ---------------------------------------------------------------------------------- flips
@pytest.mark.parametrize("patches", [1, 4, 7, 12, 196])
def test_flip_of_patch_tokens_is_its_own_inverse_and_keeps_the_class_token_last(patches):
    x = torch.randn(2, patches + 1, 3)
    flipped = flip_patch_tokens(x)
    torch.testing.assert_close(flipped[:, -1], x[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(flipped[:, :-1], x[:, :-1].flip(1), rtol=0, atol=0)
    torch.testing.assert_close(flip_patch_tokens(flipped), x, rtol=0, atol=0)


def test_flip_schedules():
    flipped = {s: [n for n in range(12) if layer_flips(s, n)] for s in ("released", "pairs", "alternate", "none")}
    assert flipped["released"] == [2, 3]  # n // 2 == 1
    assert flipped["pairs"] == [2, 3, 6, 7, 10, 11]  # (n // 2) % 2 == 1
    assert flipped["alternate"] == [1, 3, 5, 7, 9, 11]  # n % 2 == 1
    assert flipped["none"] == []
    with pytest.raises(ValueError, match="flip_schedule"):
        small(flip_schedule="every")


# ---------------------------------------------------------------------------------- the mixer
def mixer_reference(m, u, scan):
    """The Mamba-2 mixer written out from its description, with `scan(x, dt, A, B, C, D)` for the SSM:
    x (b, L, H, P), dt (b, L, H) after softplus, A (H,), B / C (b, L, G, N), D (H,) -> (b, L, H, P)."""
    b, L, _ = u.shape
    d_inner, H, P, G, N, K = m.d_inner, m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv
    zxbcdt = u @ m.in_proj.weight.T
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner : 2 * d_inner + 2 * G * N]
    dt = zxbcdt[..., 2 * d_inner + 2 * G * N :]
    assert dt.shape[-1] == H
    # causal depthwise conv: out[t] = bias + sum_k w[k] * in[t - (K - 1) + k]
    padded = F.pad(xBC, (0, 0, K - 1, 0))
    w = m.conv1d.weight[:, 0, :]  # (channels, K)
    conv = sum(padded[:, k : k + L] * w[:, k] for k in range(K)) + m.conv1d.bias
    xBC = conv * torch.sigmoid(conv)
    x = xBC[..., :d_inner].reshape(b, L, H, P)
    B = xBC[..., d_inner : d_inner + G * N].reshape(b, L, G, N)
    C = xBC[..., d_inner + G * N :].reshape(b, L, G, N)
    dt = F.softplus(dt + m.dt_bias)
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*m.dt_limit)
    y = scan(x, dt, -torch.exp(m.A_log), B, C, m.D).reshape(b, L, d_inner)
    g = y * (z * torch.sigmoid(z))
    g = g.reshape(b, L, G, d_inner // G)
    g = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(b, L, d_inner) * m.norm.weight
    return g @ m.out_proj.weight.T


def heads_of_groups(t, H):
    """(b, L, G, N) -> (b, L, H, N): head h reads group h // (H / G)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def ssd_chunked(x, dt, A, B, C, D, chunk=4):
    """Mamba-2's chunked SSD: within a chunk the quadratic (attention-like) form with segment sums of the
    log-decays; across chunks the states are passed on."""
    b, L, H, P = x.shape
    B, C = heads_of_groups(B, H), heads_of_groups(C, H)
    pad = (-L) % chunk
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (L + pad) // chunk

    def chunks(t):
        return t.reshape(b, nc, chunk, *t.shape[2:])

    x, dt, B, C = chunks(x), chunks(dt), chunks(B), chunks(C)
    cum = torch.cumsum(dt * A, dim=2)  # (b, c, T, H): log of the decay from the chunk start
    seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, c, t, s, H): sum of log-decays over (s, t]
    causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))[None, None, :, :, None]
    decay = torch.where(causal, torch.exp(seg.masked_fill(~causal, 0.0)), torch.zeros_like(seg))
    scores = torch.einsum("bcthn,bcshn->bctsh", C, B) * decay
    y_diag = torch.einsum("bctsh,bcsh,bcshp->bcthp", scores, dt, x)
    # each chunk's own contribution to the state at its end
    to_end = torch.exp(cum[:, :, -1:] - cum)
    chunk_states = torch.einsum("bcsh,bcsh,bcshn,bcshp->bchpn", to_end, dt, B, x)
    carried = [torch.zeros_like(chunk_states[:, 0])]
    for c in range(nc - 1):
        carried.append(torch.exp(cum[:, c, -1])[..., None, None] * carried[-1] + chunk_states[:, c])
    carried = torch.stack(carried, dim=1)  # (b, c, H, P, N): the state entering chunk c
    y_off = torch.einsum("bcthn,bchpn,bcth->bcthp", C, carried, torch.exp(cum))
    y = (y_diag + y_off).reshape(b, nc * chunk, H, P)[:, :L]
    return y + D[:, None] * x.reshape(b, nc * chunk, H, P)[:, :L]


def headwise_lb_loop(window):
    """The LB scan per head, written with explicit loops over positions: the head's state is (P, N);
    a global forward state, plus inside each window of `window` positions a local backward state."""

    def scan(x, dt, A, B, C, D):
        b, L, H, P = x.shape
        B, C = heads_of_groups(B, H), heads_of_groups(C, H)
        W = resolve_window(window, L)
        out = torch.zeros_like(x)
        for h in range(H):
            a = torch.exp(dt[:, :, h] * A[h])  # (b, L)
            xs = [dt[:, t, h, None, None] * x[:, t, h, :, None] * B[:, t, h, None, :] for t in range(L)]
            forward = []
            state = torch.zeros_like(xs[0])
            for t in range(L):
                state = a[:, t, None, None] * state + xs[t]
                forward.append(state)
            for start in range(0, L, W):
                back = torch.zeros_like(xs[0])
                for t in reversed(range(start, min(start + W, L))):
                    back = a[:, t, None, None] * back + xs[t]
                    total = forward[t] + back - xs[t]
                    out[:, t, h] = torch.einsum("bpn,bn->bp", total, C[:, t, h]) + D[h] * x[:, t, h]
        return out

    return scan


def repeated_per_channel_ref(window):
    """The scan as the doc maps it onto selective_scan_ref: per-head values repeated over the head's
    channels, B / C grouped."""

    def scan(x, dt, A, B, C, D):
        b, L, H, P = x.shape
        u = x.reshape(b, L, H * P).transpose(1, 2)
        delta = dt.repeat_interleave(P, dim=2).transpose(1, 2)  # (b, d_inner, L), already softplus'd
        A_full = A.repeat_interleave(P)[:, None].expand(H * P, B.shape[-1])
        y = selective_scan_ref(u, delta, A_full, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D.repeat_interleave(P),
                               window=resolve_window(window, L))
        return y.transpose(1, 2).reshape(b, L, H, P)

    return scan


def small_mixer(window, seed=0, **kwargs):
    torch.manual_seed(seed)
    mixer = Mamba2(16, d_state=6, headdim=8, window=window, **kwargs).double()
    return randomise(mixer, seed=seed + 1, scale=0.2)


def mixer_input(L=13, seed=3):
    return torch.randn(2, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("L,chunk", [(13, 4), (16, 4), (9, 16)])
def test_mamba2_mixer_window_1_equals_the_chunked_ssd_reference(L, chunk):
    mixer = small_mixer(1)
    u = mixer_input(L)
    expected = mixer_reference(mixer, u, lambda *a: ssd_chunked(*a, chunk=chunk))
    torch.testing.assert_close(mixer(u), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [1, 3, "auto"])
@pytest.mark.parametrize("kwargs", [{}, {"ngroups": 2}, {"dt_limit": (0.01, 0.2)}])
def test_mamba2_mixer_equals_the_headwise_lb_loop(window, kwargs):
    mixer = small_mixer(window, **kwargs)
    u = mixer_input()
    expected = mixer_reference(mixer, u, headwise_lb_loop(window))
    torch.testing.assert_close(mixer(u), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", ["auto", 5])
def test_lb_mixer_equals_selective_scan_ref_with_per_head_values_repeated(window):
    mixer = small_mixer(window, ngroups=2)
    u = mixer_input(L=11)
    expected = mixer_reference(mixer, u, repeated_per_channel_ref(window))
    torch.testing.assert_close(mixer(u), expected, rtol=1e-10, atol=1e-10)
    # and the LB scan is not the plain one
    plain = mixer_reference(mixer, u, repeated_per_channel_ref(1))
    assert (mixer(u) - plain).abs().max() > 1e-4


def test_the_chunked_ssd_reference_equals_the_headwise_loop_with_window_1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 4, dtype=torch.float64, generator=g)
    dt = F.softplus(torch.randn(2, 10, 3, dtype=torch.float64, generator=g))
    A = -torch.rand(3, dtype=torch.float64, generator=g) * 2
    B, C = (torch.randn(2, 10, 1, 5, dtype=torch.float64, generator=g) for _ in range(2))
    D = torch.randn(3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, D, chunk=3), headwise_lb_loop(1)(x, dt, A, B, C, D))


def test_gated_rms_norm_normalises_y_times_silu_z():
    g = torch.Generator().manual_seed(0)
    y, z, w = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(gated_rms_norm(y, z, w), rms(y * F.silu(z), w))
    halves = torch.cat([rms(t, 1.0) for t in (y * F.silu(z)).split(4, dim=-1)], -1) * w
    torch.testing.assert_close(gated_rms_norm(y, z, w, group_size=4), halves)
    torch.testing.assert_close(gated_rms_norm(y, z, w, norm_before_gate=True), rms(y, w) * F.silu(z))


def test_mixer_gradients_reach_every_parameter():
    mixer = small_mixer("auto")
    mixer(mixer_input()).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_lb_tiny_scans_198_tokens_with_window_8(monkeypatch):
    import lbmamba.nn.mamba2 as mamba2

    calls = []
    real = mamba2.selective_scan_fn

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
        calls.append((tuple(u.shape), tuple(A.shape), tuple(B.shape), kw["window"], z, delta_softplus))
        return real(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kw)

    monkeypatch.setattr(mamba2, "selective_scan_fn", spy)
    torch.manual_seed(0)
    model = timm.create_model("lb_adventurer_tiny_patch16_224", depth=1).eval()
    with torch.no_grad():
        model(images(1, 224))
    assert calls == [((1, 512, 198), (512, 64), (1, 1, 64, 198), "auto", None, True)]
    assert resolve_window("auto", 198) == 8


# ---------------------------------------------------------------------------------- the model
def official_forward(model, x, flips):
    """The block as the doc describes it, written out (the mixer itself is checked above)."""
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([t, model.cls_token.expand(x.shape[0], -1, -1)], 1) + model.pos_embed
    outs = []
    for n, layer in enumerate(model.layers):
        y = rms(t, layer.norm.weight)
        if n in flips:
            y = torch.cat([y[:, :-1].flip(1), y[:, -1:]], 1)
        y = torch.cat([y.mean(1, keepdim=True), y], 1)  # the mean includes the class token
        y = layer.mixer(y)[:, 1:]
        if n in flips:
            y = torch.cat([y[:, :-1].flip(1), y[:, -1:]], 1)
        t = t + y
        m = rms(t, layer.norm_mlp.weight)
        t = t + layer.mlp.w3(F.silu(layer.mlp.w1(m)) * layer.mlp.w2(m))
        outs.append(t)
    feats = rms(t, model.norm_f.weight)
    return feats, model.head(feats[:, -1]), outs


@pytest.mark.parametrize("schedule,flips", [("released", {2, 3}), ("pairs", {2, 3}), ("alternate", {1, 3})])
@pytest.mark.parametrize("name", ["adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224"])
def test_model_equals_the_hand_written_official_forward(name, schedule, flips):
    model = randomise(small(name, flip_schedule=schedule)).eval()
    x = images()
    with torch.no_grad():
        feats, logits, outs = official_forward(model, x, flips)
        torch.testing.assert_close(model.forward_features(x), feats)
        torch.testing.assert_close(model(x), logits)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, feats)
        for got, want in zip(inter, outs):
            torch.testing.assert_close(got, want[:, :-1])
        pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        spatial, cls = pairs[0]
        torch.testing.assert_close(spatial, outs[-1][:, :-1].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
        torch.testing.assert_close(cls, outs[-1][:, -1:])


def test_pairs_schedule_flips_layers_6_and_7_too():
    model = randomise(small("adventurer_tiny_patch16_224", depth=8, flip_schedule="pairs")).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(model, x, {2, 3, 6, 7})[1])
        model.flip_schedule = "released"
        torch.testing.assert_close(model(x), official_forward(model, x, {2, 3})[1])
        assert not torch.allclose(model(x), official_forward(model, x, {2, 3, 6, 7})[1])


def test_lb_model_with_window_1_equals_the_original_with_the_same_weights():
    orig = randomise(small("adventurer_tiny_patch16_224")).eval()
    lb1 = small("lb_adventurer_tiny_patch16_224", window=1).eval()
    lb = small("lb_adventurer_tiny_patch16_224").eval()
    lb1.load_state_dict(orig.state_dict())
    lb.load_state_dict(orig.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(lb1(x), orig(x), rtol=0, atol=0)
        assert (lb(x) - orig(x)).abs().max() > 1e-4  # the LB window changes the computation


@pytest.mark.parametrize("size", [224, (160, 96)])
def test_tiny_forward_and_backward(size):
    torch.manual_seed(0)
    model = timm.create_model("lb_adventurer_tiny_patch16_224", drop_path_rate=0.1)
    out = model(images(1, size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_other_image_sizes_resample_the_position_embedding():
    model = randomise(small(img_size=48)).eval()
    assert model.pos_embed.shape == (1, 37, 16)
    x = images(2, (32, 56))  # a 4 x 7 grid
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        assert out.shape == (2, 16, 4, 7) and model(x).shape == (2, 10)
    with pytest.raises(Exception, match="divisible"):
        model(images(1, 30))


def test_features_only_pooling_and_reset_classifier():
    torch.manual_seed(0)
    feats = timm.create_model("lb_adventurer_tiny_patch16_224", features_only=True, out_indices=(1, 3), **SMALL)
    torch.manual_seed(0)
    model = small().eval()
    x = images()
    with torch.no_grad():
        outs = feats(x)
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want)
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, -1])
        model.reset_classifier(3, global_pool="avg")
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, :-1].mean(1))
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, 16)
    assert feats.feature_info.channels() == [16, 16] and feats.feature_info.reduction() == [8, 8]


def test_grad_checkpointing_gives_the_same_gradients():
    x = images()
    grads = []
    for enable in (False, True):
        model = randomise(small())
        model.set_grad_checkpointing(enable)
        F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_bfloat16_autocast_runs():
    model = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()


def test_digits_configuration_in_chans_1():
    torch.manual_seed(0)
    model = timm.create_model("lb_adventurer_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32,
                              drop_path_rate=0.1, embed_dim=64, depth=2)
    assert model(images(2, 32, chans=1)).shape == (2, 10)


# ---------------------------------------------------------------------------------- checkpoints
def official_state_dict(seed=5, **kwargs):
    """A state dict of the official layout (from a model built with the same names and shapes)."""
    model = randomise(small("adventurer_tiny_patch16_224", **kwargs), seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["adventurer_tiny_patch16_224", "lb_adventurer_tiny_patch16_224"])
def test_official_checkpoint_file_loads_strict(name, tmp_path):
    sd = official_state_dict()
    ema = official_state_dict(seed=6)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                "scaler": {"scale": 1.0}, "args": argparse.Namespace(model="adventurer_tiny_patch16")}, path)
    model = small(name, seed=9)
    result = load_checkpoint(model, path)
    assert result.ok
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)  # 'model', not 'model_ema'
    load_checkpoint(model, read_file(path)["model_ema"])  # the EMA weights, passed as such
    torch.testing.assert_close(model.layers[0].mixer.A_log, ema["layers.0.mixer.A_log"], rtol=0, atol=0)


def test_wrapped_and_prefixed_state_dicts_load_strict():
    sd = official_state_dict()
    assert set(sd) == official_keys(SMALL["depth"])
    for wrapped in ({"model": {f"module.{k}": v for k, v in sd.items()}}, {"state_dict": sd},
                    {f"module.{k}": v for k, v in sd.items()}):
        model = small(seed=9)
        assert load_checkpoint(model, wrapped).ok
        torch.testing.assert_close(model.pos_embed, sd["pos_embed"], rtol=0, atol=0)


def test_checkpoint_of_another_size_resamples_pos_embed_with_the_class_entry_last():
    sd = official_state_dict()  # 4 x 4 grid at 32 px
    model = small(img_size=48, seed=9)  # 6 x 6 grid
    assert load_checkpoint(model, {"model": sd}).ok
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 37, 16)
    torch.testing.assert_close(pos[:, -1], sd["pos_embed"][:, -1], rtol=0, atol=0)
    from timm.layers import resample_abs_pos_embed  # the patch entries: timm's resampler (antialiased bicubic)

    want = resample_abs_pos_embed(sd["pos_embed"][:, :-1], [6, 6], [4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(pos[:, :-1], want, rtol=0, atol=0)


def test_mismatched_checkpoint_is_reported():
    sd = official_state_dict()
    del sd["layers.0.mixer.dt_bias"]
    with pytest.raises(CheckpointMismatchError, match="dt_bias"):
        load_checkpoint(small(), sd)
