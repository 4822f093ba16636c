"""LBVim / Vim / uVim: sizes, names, the timm model API, semantics, checkpoints and a short overfit."""

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import lbmamba
from lbmamba.models import CheckpointMismatchError, CheckpointReadError, load_checkpoint
from lbmamba.nn.pos_embed import class_token_index

# (name, params in millions from docs/models.md)
PARAM_COUNTS = [
    ("lbvim_tiny_patch16_224", 6.4),
    ("lbvim_300_patch16_224", 14.9),
    ("lbvim_small_patch16_224", 23.9),
    ("lbvim_528_patch16_224_atthead", 44.8),
    # Vim-T: docs/models.md and the paper say "7 M", a rounding of the reference architecture's
    # 7,148,008 parameters (the same key set and shapes as the reference code; 2.1 % above 7.0)
    ("vim_tiny_patch16_224", 7.15),
    ("vim_small_patch16_224", 26.0),
]

MIXER_KEYS = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
)
BI_MIXER_KEYS = ("A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                 "dt_proj_b.bias", "D_b")

# small shapes used for anything that runs
SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_classes=10)


def small(name="lbvim_tiny_patch16_224", seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SMALL, **kwargs))


def randomise(model, seed=1, scale=0.05):
    """Perturb every parameter so equalities cannot hold by accident (norm weights = 1, D = 1...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def images(batch=2, size=32, chans=3, seed=0):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ---------------------------------------------------------------------------------- registry, sizes, names
def test_models_register_with_timm_on_import():
    names = set(timm.list_models("*vim*"))
    expected = {
        "lbvim_tiny_patch16_224", "lbvim_300_patch16_224", "lbvim_small_patch16_224",
        "lbvim_528_patch16_224_atthead", "uvim_tiny_patch16_224",
        "vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
    }
    assert expected <= names
    assert lbmamba.load_checkpoint is load_checkpoint


def test_reference_names_build_the_same_models():
    from lbmamba.models.lbvim import VIM_ALIASES

    for alias, name in VIM_ALIASES.items():
        with torch.device("meta"):
            a, b = timm.create_model(alias), timm.create_model(name)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert a.pretrained_cfg["architecture"] == name


@pytest.mark.parametrize("name,millions", PARAM_COUNTS)
def test_parameter_counts(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.02, f"{name}: {count:.2f} M, expected {millions} M"


def test_lbvim_tiny_state_dict_keys():
    model = timm.create_model("lbvim_tiny_patch16_224")
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm_f.weight", "head.weight",
                "head.bias"}
    for i in range(24):
        expected |= {
            f"layers.{i}.mixer.in_proj.weight",
            f"layers.{i}.mixer.conv1d.weight",
            f"layers.{i}.mixer.conv1d.bias",
            f"layers.{i}.mixer.x_proj.weight",
            f"layers.{i}.mixer.dt_proj.weight",
            f"layers.{i}.mixer.dt_proj.bias",
            f"layers.{i}.mixer.A_log",
            f"layers.{i}.mixer.D",
            f"layers.{i}.mixer.out_proj.weight",
            f"layers.{i}.norm.weight",
        }
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 196, 192)
    assert sd["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert sd["layers.0.mixer.in_proj.weight"].shape == (768, 192)
    assert sd["layers.0.mixer.A_log"].shape == (384, 16)
    assert sd["layers.0.mixer.x_proj.weight"].shape == (12 + 32, 384)


def test_vim_tiny_state_dict_keys():
    model = timm.create_model("vim_tiny_patch16_224")
    expected = {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token", "norm_f.weight",
        "head.weight", "head.bias",
    }
    for i in range(24):
        expected |= {
            f"layers.{i}.mixer.in_proj.weight",
            f"layers.{i}.mixer.conv1d.weight",
            f"layers.{i}.mixer.conv1d.bias",
            f"layers.{i}.mixer.x_proj.weight",
            f"layers.{i}.mixer.dt_proj.weight",
            f"layers.{i}.mixer.dt_proj.bias",
            f"layers.{i}.mixer.A_log",
            f"layers.{i}.mixer.D",
            f"layers.{i}.mixer.out_proj.weight",
            f"layers.{i}.mixer.A_b_log",
            f"layers.{i}.mixer.conv1d_b.weight",
            f"layers.{i}.mixer.conv1d_b.bias",
            f"layers.{i}.mixer.x_proj_b.weight",
            f"layers.{i}.mixer.dt_proj_b.weight",
            f"layers.{i}.mixer.dt_proj_b.bias",
            f"layers.{i}.mixer.D_b",
            f"layers.{i}.norm.weight",
        }
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 197, 192) and sd["cls_token"].shape == (1, 1, 192)
    # aliases build the same architecture
    alias = timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
    assert {k: v.shape for k, v in alias.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_atthead_keys_and_hand_written_attention_pooling():
    model = small("lbvim_528_patch16_224_atthead", embed_dim=48).eval()
    head_keys = sorted(k for k in model.state_dict() if k.startswith("head"))
    assert head_keys == sorted(
        ["head.0.latent", "head.0.kv.weight", "head.0.kv.bias", "head.0.post_norm.weight", "head.0.post_norm.bias",
         "head.1.weight", "head.1.bias"]
    )
    assert model.head[0].kv.weight.shape == (96, 48)
    with torch.device("meta"):
        full = timm.create_model("lbvim_528_patch16_224_atthead")
    assert full.head[0].kv.weight.shape == (1056, 528) and full.head[0].num_heads == 6
    assert model.pretrained_cfg["classifier"] == "head.1"
    randomise(model)
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        pool = model.head[0]
        B, N, C = tokens.shape
        h, hd = 6, C // 6
        q = pool.latent.reshape(1, h, hd).expand(B, h, hd)
        k, v = (tokens @ pool.kv.weight.T + pool.kv.bias).split(C, dim=-1)
        k, v = k.reshape(B, N, h, hd), v.reshape(B, N, h, hd)
        att = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(hd), dim=-1)
        pooled = torch.einsum("bhn,bnhd->bhd", att, v).reshape(B, C)
        pooled = F.layer_norm(pooled, (C,), pool.post_norm.weight, pool.post_norm.bias, 1e-5)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)
        torch.testing.assert_close(model(x), model.head[1](pooled))
    model.reset_classifier(3)  # keeps the trained pooling
    assert model.head[0] is pool and model(x).shape == (2, 3)


def test_pretrained_cfg_and_data_config():
    for name in ("lbvim_tiny_patch16_224", "vim_small_patch16_224", "uvim_tiny_patch16_224"):
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
        assert cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
        assert cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
        assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
        assert tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD
        data = timm.data.resolve_data_config({}, model=model)
        assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"


def test_model_configurations():
    with torch.device("meta"):
        lb = timm.create_model("lbvim_tiny_patch16_224")
        u = timm.create_model("uvim_tiny_patch16_224")
        vim = timm.create_model("vim_tiny_patch16_224")
    assert lb.flip_every_layer and lb.class_token is None and lb.global_pool == "mean"
    assert all(layer.mixer.scan == "lb" and layer.mixer.window == "auto" for layer in lb.layers)
    assert all(layer.mixer.scan == "lb" and layer.mixer.window == 1 for layer in u.layers)
    assert not vim.flip_every_layer and vim.class_token == "middle" and vim.global_pool == "token"
    assert all(layer.mixer.scan == "bi" and layer.mixer.if_divide_out for layer in vim.layers)
    assert class_token_index(196, "middle") == 98  # index 98 of 197 at 224 px, as Vim


def test_initialisation():
    torch.manual_seed(0)
    model = timm.create_model("lbvim_tiny_patch16_224")
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert abs(model.head.weight.std().item() - 0.02) < 0.002 and model.head.bias.abs().max() == 0
    bound = 1 / math.sqrt(384) / math.sqrt(24)  # kaiming-uniform(a=sqrt 5) bound, rescaled by 1/sqrt(depth)
    for layer in model.layers:
        w = layer.mixer.out_proj.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.allclose(layer.mixer.A_log, torch.log(torch.arange(1, 17.0)).expand(384, 16))
        assert torch.equal(layer.mixer.D, torch.ones(384))
        dt = F.softplus(layer.mixer.dt_proj.bias)
        assert dt.min() >= 0.000999 and dt.max() <= 0.1001


# ---------------------------------------------------------------------------------- semantics
def test_two_layer_lbvim_equals_hand_written_blocks_with_flips():
    model = randomise(small(window=4)).eval()
    x = images()
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        h, r = model.layers[0](tokens, None)
        out0 = r + h  # layer 0 output, image order
        h, r = h.flip(1), r.flip(1)  # layer 1 scans right to left: windows aligned at the image's end
        h, r = model.layers[1](h, r)
        out1 = (r + h).flip(1)
        h, r = h.flip(1), r.flip(1)
        feats = rms(r + h, model.norm_f.weight)
        logits = model.head(feats.mean(1))

        torch.testing.assert_close(model.forward_features(x), feats)
        torch.testing.assert_close(model(x), logits)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(final, feats)
        torch.testing.assert_close(inter[0], out0)
        torch.testing.assert_close(inter[1], out1)
        nchw = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        torch.testing.assert_close(nchw, out1.reshape(2, 8, 8, -1).permute(0, 3, 1, 2))


def test_forward_intermediates_mixer_source_gives_the_blocks_hidden_states_in_image_order():
    model = randomise(small(window=4)).eval()
    x = images()
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        h0, r = model.layers[0](tokens, None)
        h1, _ = model.layers[1](h0.flip(1), r.flip(1))  # layer 1 sees the sequence reversed
        mixer = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, source="mixer")
        torch.testing.assert_close(mixer[0], h0)
        torch.testing.assert_close(mixer[1], h1.flip(1))
        # the default stays the residual stream
        residual = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(residual[0], r + h0)
        assert not torch.allclose(residual[1], mixer[1])
    with pytest.raises(ValueError, match="source must be one of"):
        model.forward_intermediates(x, source="hidden")
    with pytest.raises(ValueError, match="does not apply to source='mixer'"):
        model.forward_intermediates(x, source="mixer", norm=True)


def test_odd_depth_output_is_back_in_image_order():
    model = randomise(small(depth=3, window=2)).eval()
    x = images()
    with torch.no_grad():
        h = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        r = None
        for layer in model.layers:  # the reference code: flip after every layer, the last one included
            h, r = layer(h, r)
            h, r = h.flip(1), r.flip(1)
        feats = rms(r + h, model.norm_f.weight).flip(1)  # 3 flips: reverse once more for image order
        torch.testing.assert_close(model.forward_features(x), feats)


def test_vim_middle_class_token_and_token_pooling():
    model = randomise(small("vim_tiny_patch16_224")).eval()
    x = images()
    with torch.no_grad():
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # 64 patches: class token at 32
        tokens = torch.cat([patches[:, :32], model.cls_token.expand(2, -1, -1), patches[:, 32:]], 1) + model.pos_embed
        h, r = model.layers[0](tokens, None)
        h, r = model.layers[1](h, r)  # no flips in Vim
        feats = rms(r + h, model.norm_f.weight)
        torch.testing.assert_close(model.forward_features(x), feats)
        torch.testing.assert_close(model(x), model.head(feats[:, 32]))
        # spatial intermediates drop the class token
        inter = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
        out = r + h
        torch.testing.assert_close(inter, torch.cat([out[:, :32], out[:, 33:]], 1))
        pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        torch.testing.assert_close(pairs[0][1], out[:, 32:33])
        assert pairs[0][0].shape == (2, 32, 8, 8)


# ---------------------------------------------------------------------------------- timm model API
@pytest.mark.parametrize("name", ["lbvim_tiny_patch16_224", "vim_tiny_patch16_224"])
def test_forward_intermediates_final_equals_forward_features(name):
    model = randomise(small(name, depth=3)).eval()
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        for fmt in ("NCHW", "NLC"):
            final, inter = model.forward_intermediates(x, output_fmt=fmt)
            torch.testing.assert_close(final, feats, rtol=0, atol=0)
            assert len(inter) == 3
            shape = (2, 32, 8, 8) if fmt == "NCHW" else (2, 64, 32)
            assert all(t.shape == shape for t in inter)
        # norm=True: the last intermediate, normalised, is forward_features' spatial part
        last = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
        index = class_token_index(64, model.class_token)
        spatial = feats if index is None else torch.cat([feats[:, :index], feats[:, index + 1 :]], 1)
        torch.testing.assert_close(last, spatial)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        nchw = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(early[0], nchw[0])
        torch.testing.assert_close(nchw[0].flatten(2).transpose(1, 2), inter[0])  # NCHW is NLC reshaped


def test_features_only():
    torch.manual_seed(0)
    features = timm.create_model(
        "lbvim_tiny_patch16_224", features_only=True, out_indices=(1, 3), depth=4, embed_dim=32, img_size=64
    )
    torch.manual_seed(0)
    model = timm.create_model("lbvim_tiny_patch16_224", depth=4, embed_dim=32, img_size=64)
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [16, 16]
    x = images(size=64)
    with torch.no_grad():
        outs = features(x)
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 4, 4), (2, 32, 4, 4)]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want)
    vim_feats = timm.create_model("vim_tiny_patch16_224", features_only=True, depth=3, embed_dim=32, img_size=64)
    assert [tuple(o.shape) for o in vim_feats(x)] == [(2, 32, 4, 4)] * 3  # default: last 3 layers


def test_prune_intermediate_layers():
    model = small(depth=4)
    kept = model.prune_intermediate_layers([1], prune_norm=True)
    assert kept == [1] and len(model.layers) == 2 and model.num_classes == 0
    assert model.forward_intermediates(images(), indices=[1], intermediates_only=True)[0].shape == (2, 32, 8, 8)


def test_reset_classifier_and_pooling():
    model = small(attn_pool_heads=4).eval()
    x = images()
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), feats.mean(1))
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    vim = small("vim_tiny_patch16_224").eval()
    vim.reset_classifier(4, global_pool="avg")  # timm's name for mean pooling
    with torch.no_grad():
        feats = vim.forward_features(x)
        pooled = vim.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, torch.cat([feats[:, :32], feats[:, 33:]], 1).mean(1))
    assert vim(x).shape == (2, 4)
    with pytest.raises(ValueError, match="class token"):
        model.reset_classifier(3, global_pool="token")
    model.reset_classifier(3, global_pool="attn")
    assert model(x).shape == (2, 3)


def test_in_chans_1():
    model = small(in_chans=1)
    assert model.patch_embed.proj.weight.shape[1] == 1
    assert model(images(chans=1)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lbvim_tiny_patch16_224", "vim_tiny_patch16_224"])
def test_image_sizes_160_and_256(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2, embed_dim=32, img_size=160).eval()
    tokens = 100 + (1 if model.class_token else 0)
    assert model.pos_embed.shape == (1, tokens, 32)
    x160 = images(1, 160)
    assert model(x160).shape == (1, 1000)
    torch.manual_seed(0)
    at224 = timm.create_model(name, depth=2, embed_dim=32).eval()
    x256 = images(1, 256)  # not the size the model was built for: pos_embed resampled on the fly
    with torch.no_grad():
        assert at224(x256).shape == (1, 1000)
        inter = at224.forward_intermediates(x256, indices=1, intermediates_only=True)
    assert inter[0].shape == (1, 32, 16, 16)
    with pytest.raises(Exception, match="divisible"):
        at224(images(1, 250))


def test_grad_checkpointing_gives_the_same_gradients():
    x = images()
    target = torch.tensor([1, 3])
    grads = []
    for enable in (False, True):
        model = randomise(small(depth=3))
        model.set_grad_checkpointing(enable)
        F.cross_entropy(model(x), target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_no_weight_decay_is_the_reference_vims_and_the_ssm_marks_stay():
    """Vim's `no_weight_decay()` names pos_embed and cls_token only: with timm's rule A_log (2-d) is decayed,
    D (1-d) is not. A_log / D keep their `_no_weight_decay` marks, which an optimizer may read on its own."""
    for name in ("vim_tiny_patch16_224", "lbvim_tiny_patch16_224"):
        model = small(name)
        assert model.no_weight_decay() == {"pos_embed", "cls_token"}
        mixers = [layer.mixer for layer in model.layers]
        names = ("A_log", "D", "A_b_log", "D_b") if name.startswith("vim") else ("A_log", "D")
        assert all(getattr(m, n)._no_weight_decay for m in mixers for n in names)
    vim = small("vim_tiny_patch16_224")
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(vim, 0.05, no_weight_decay_list=vim.no_weight_decay())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(vim.pos_embed) in no_decay and id(vim.cls_token) in no_decay and id(vim.layers[1].mixer.D) in no_decay
    assert id(vim.layers[1].mixer.A_log) not in no_decay and id(vim.layers[1].mixer.A_b_log) not in no_decay


def test_group_matcher_groups_the_stem_each_layer_and_the_final_norm():
    vim = small("vim_tiny_patch16_224")
    grouped = timm.models.group_parameters(vim, vim.group_matcher())
    assert "patch_embed.proj.weight" in grouped[0] and len(grouped) == 2 + 2  # stem, 2 layers, norm_f


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = randomise(small()).eval()
    x = images()
    with torch.no_grad():
        expected = source(x)
    sd = source.state_dict()
    files = {
        "wrapped.pth": lambda p: torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, p),
        "plain.pth": lambda p: torch.save(sd, p),
        "weights.safetensors": lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, str(p)),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        target = small(seed=123).eval()
        result = load_checkpoint(target, path)
        assert result.ok
        with torch.no_grad():
            torch.testing.assert_close(target(x), expected, rtol=0, atol=0, msg=name)


def test_checkpoint_at_another_image_size_resizes_pos_embed(tmp_path):
    from timm.layers import resample_abs_pos_embed

    for name in ("lbvim_tiny_patch16_224", "vim_tiny_patch16_224"):
        source = small(name)
        path = tmp_path / f"{name}.pth"
        torch.save({"model": source.state_dict()}, path)
        target = small(name, img_size=48, seed=5)  # 12 x 12 patches instead of 8 x 8
        load_checkpoint(target, path)
        old = source.pos_embed.detach()
        if name.startswith("vim"):  # class-token entry stays itself, at the new middle (72 of 145)
            torch.testing.assert_close(target.pos_embed[:, 72], old[:, 32])
            old_patches = torch.cat([old[:, :32], old[:, 33:]], 1)
            new_patches = torch.cat([target.pos_embed[:, :72], target.pos_embed[:, 73:]], 1)
        else:
            old_patches, new_patches = old, target.pos_embed
        want = resample_abs_pos_embed(old_patches, [12, 12], [8, 8], num_prefix_tokens=0)
        torch.testing.assert_close(new_patches.detach(), want)
        assert target(images(size=48)).shape == (2, 10)


def test_bad_checkpoint_gives_a_clear_error(tmp_path):
    sd = small().state_dict()
    sd.pop("layers.1.mixer.A_log")
    sd["layers.7.mixer.D"] = torch.ones(64)
    sd["head.weight"] = torch.zeros(1000, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(small(), path)
    message = str(info.value)
    assert "missing" in message and "layers.1.mixer.A_log" in message
    assert "unexpected" in message and "layers.7.mixer.D" in message
    assert "mis-shaped" in message and "head.weight" in message and "[1000, 32]" in message and "[10, 32]" in message
    model = small()
    with pytest.warns(UserWarning):
        result = load_checkpoint(model, path, strict=False)
    assert result.missing_keys == ["layers.1.mixer.A_log"]
    assert torch.equal(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    with pytest.raises(CheckpointReadError, match="checkpoint not found"):
        load_checkpoint(model, tmp_path / "nothing.pth")


def test_timm_pretrained_file(tmp_path):
    from safetensors.torch import save_file

    # num_classes as in the pretrained cfg (1000): timm drops the classifier of a checkpoint otherwise
    source = randomise(small(num_classes=1000)).eval()
    x = images()
    with torch.no_grad():
        expected = source(x)
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, pth)
    st = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    for path in (pth, st):
        model = timm.create_model(
            "lbvim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
            **dict(SMALL, num_classes=1000),
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # another image size (pos_embed resampled by checkpoint_filter_fn) and another class count (head dropped)
    model = timm.create_model(
        "lbvim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(pth)),
        **dict(SMALL, img_size=48, num_classes=3),
    )
    assert model.pos_embed.shape == (1, 144, 32) and model(images(size=48)).shape == (2, 3)
    torch.testing.assert_close(model.layers[1].mixer.A_log, source.layers[1].mixer.A_log)


# ---------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", ["lbvim_tiny_patch16_224", "vim_tiny_patch16_224"])
def test_reduced_model_overfits_8_images(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, patch_size=4, embed_dim=64, depth=2, num_classes=8)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    first = None
    for step in range(50):  # noqa: B007  (the message after the loop reports it)
        loss = F.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        if loss.item() < 0.1 * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, f"{name}: loss {first:.3f} -> {loss.item():.3f} after {step + 1} steps"


def test_a_checkpoint_of_another_model_is_a_mismatch_not_a_crash(tmp_path):
    """A Vim checkpoint (class token: 17 position entries for a 4 x 4 grid) into an LBVim: the position
    embedding cannot be resampled, which is a mismatch like any other."""
    torch.save({"model": small("vim_tiny_patch16_224", img_size=32, patch_size=8).state_dict()}, tmp_path / "vim.pth")
    with pytest.raises(CheckpointMismatchError, match="does not fit VisionMamba: cannot infer the position-embedding"):
        load_checkpoint(small(img_size=32, patch_size=8), tmp_path / "vim.pth")


def test_vims_backward_step_sizes_start_at_softplus_zero():
    """Vim's model-wide init zeroes every Linear bias but the forward dt_proj's (the only one mamba_ssm marks),
    so the backward branch's steps start at softplus(0); LBVim has no backward branch."""
    vim = small("vim_tiny_patch16_224")
    for layer in vim.layers:
        assert torch.count_nonzero(layer.mixer.dt_proj_b.bias) == 0
        dt = F.softplus(layer.mixer.dt_proj.bias)
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
