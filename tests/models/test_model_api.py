"""timm's model-API contract, run over every model name this package registers (as timm's own
tests/test_models.py does): create, forward, backward, forward_features / forward_head,
forward_intermediates, features_only, reset_classifier and a state-dict round trip, once per distinct
architecture (aliases and sizes that the small test arguments make identical run once)."""

import pytest
import timm
import torch

import lbmamba  # noqa: F401  (registers the models)

pytestmark = pytest.mark.usefixtures("one_thread")


def _registered():
    return sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("lbmamba."))


MODEL_NAMES = _registered()


def _image(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _bag():
    return torch.randn(1, 11, 6, generator=torch.Generator().manual_seed(1))


#: per family (the module that registers it): small constructor arguments, an input for them, and whether its
#: features are images (NCHW) or token sequences (NLC). A new family adds one entry here.
FAMILIES = {
    "lbvim": (dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_classes=5), _image, "NCHW"),
    "mil": (dict(in_dim=6, num_classes=5, embed_dim=16, attn_dim=8), _bag, "NLC"),
    "adventurer": (dict(img_size=32, patch_size=8, embed_dim=16, depth=3, d_state=8, headdim=8, num_classes=5),
                   _image, "NCHW"),
    "vmamba": (dict(img_size=32, depths=(1, 1, 2, 1), dims=8, num_classes=5), _image, "NCHW"),
    "plainmamba": (dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_classes=5), _image, "NCHW"),
    # a 4 x 4 grid: the first three searched layers (h, v and their flips, w2 and w7 padded to 7 x 7)
    "localvim": (dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_classes=5), _image, "NCHW"),
}


def _family(name):
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _create(name, seed=0, **extra):
    torch.manual_seed(seed)
    kwargs = dict(FAMILIES[_family(name)][0], **extra)
    if _family(name) == "mil" and extra.get("features_only"):
        kwargs.pop("num_classes")
    return timm.create_model(name, **kwargs)


def _input(name):
    return FAMILIES[_family(name)][1]()


def _format(name):
    return FAMILIES[_family(name)][2]


def _architecture(name):
    """What tells two names apart here: the model's class, its state's shapes and its output (seeded, one
    thread) as this test builds it; the reference code's aliases, and sizes of one family that differ
    only in what FAMILIES' arguments override, come out the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _create(name).eval()
        with torch.no_grad():
            out = model(_input(name))
    except Exception:  # its own test reports it
        return name
    finally:
        torch.set_num_threads(threads)
    return type(model), [(k, v.shape) for k, v in model.state_dict().items()], out.numpy().tobytes()


def _one_name_per_architecture(names):
    kept = []  # (architecture, name): the shortest name stands for the others
    for name in sorted(names, key=lambda n: (len(n), n)):
        arch = _architecture(name)
        if all(arch != other for other, _ in kept):
            kept.append((arch, name))
    return sorted(name for _, name in kept)


#: what the contract tests run over: one name per distinct architecture
ARCHITECTURES = _one_name_per_architecture(MODEL_NAMES)


def test_every_family_is_covered():
    assert {_family(n) for n in MODEL_NAMES} == set(FAMILIES)
    assert {"lbvim_tiny_patch16_224", "vim_tiny_patch16_224", "mambamil_lb", "abmil"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_backward_and_head(name):
    model = _create(name)
    x = _input(name)
    out = model(x)
    assert out.shape == (x.shape[0], 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (x.shape[0], model.num_features)
    assert isinstance(model.no_weight_decay(), set) and model.group_matcher()["blocks"]
    model.set_grad_checkpointing(True)
    assert model.pretrained_cfg["classifier"] and model.get_classifier() is not None


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = _input(name)
    fmt = _format(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt=fmt)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(intermediates) == len(model.feature_info)
        only = model.forward_intermediates(x, indices=1, output_fmt=fmt, intermediates_only=True)
        torch.testing.assert_close(only[0], intermediates[-1])
    for feat, info in zip(intermediates, model.feature_info):
        channels = feat.shape[1] if fmt == "NCHW" else feat.shape[-1]
        assert channels == info["num_chs"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_features_only(name):
    model = _create(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(_input(name))
    channels = model.feature_info.channels()
    assert len(feats) == len(channels) >= 1
    axis = 1 if _format(name) == "NCHW" else -1
    assert [f.shape[axis] for f in feats] == channels


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reset_classifier(name):
    model = _create(name).eval()
    x = _input(name)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], model.num_features)
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 7)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_state_dict_round_trip(name):
    source = _create(name, seed=0).eval()
    target = _create(name, seed=1).eval()
    x = _input(name)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted({min(n for n in MODEL_NAMES if _family(n) == f) for f in FAMILIES}))
def test_training_after_inference_mode(name):
    """A model first run under torch.inference_mode() (an evaluation, a benchmark) must still train: tables
    it caches on that first call (scan orders per grid size) must not be inference tensors. The image size
    is one no other test uses, so the tables are built here first."""
    size = 48 if FAMILIES[_family(name)][2] == "NCHW" else None
    model = _create(name, **({"img_size": size} if size else {}))
    x = _image(size) if size else _input(name)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
