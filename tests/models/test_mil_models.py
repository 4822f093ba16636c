"""The MIL models: MambaMIL with each mixer and ABMIL (the timm API is checked for every model in
test_model_api.py)."""

import pytest
import timm
import torch

from lbmamba.models import MIL_MODELS, create_mil_model
from lbmamba.models.mil import MODEL_NAMES

TINY = dict(embed_dim=16, d_state=4, depth=2, attn_dim=8, rate=3)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_gradients_and_rebuild_from_config(name):
    torch.manual_seed(0)
    model = create_mil_model(name, in_dim=12, num_classes=3, **TINY)
    bag = torch.randn(23, 12)
    logits, scores = model(bag, return_attention=True)
    assert logits.shape == (1, 3) and scores.shape == (1, 23)
    assert model(bag.unsqueeze(0)).shape == (1, 3)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.config["model"] == name
    rebuilt = create_mil_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    same = timm.create_model(MIL_MODELS[name], **{k: v for k, v in model.config.items() if k != "model"})
    same.load_state_dict(model.state_dict())


@pytest.mark.parametrize("lb,plain", [("lb", "mamba"), ("lb-srmamba", "srmamba")])
def test_window_one_equals_plain_scan(lb, plain):
    torch.manual_seed(1)
    a = create_mil_model(lb, in_dim=12, window=1, **TINY).eval()
    b = create_mil_model(plain, in_dim=12, **TINY).eval()
    b.load_state_dict(a.state_dict())
    bag = torch.randn(37, 12)
    torch.testing.assert_close(a(bag), b(bag), rtol=1e-5, atol=1e-6)
    # and a real window changes the result
    c = create_mil_model(lb, in_dim=12, window=4, **TINY).eval()
    c.load_state_dict(a.state_dict())
    assert not torch.allclose(c(bag), b(bag), atol=1e-6)


def test_model_input_errors():
    model = create_mil_model("lb", in_dim=12, **TINY)
    with pytest.raises(ValueError, match="12-d"):
        model(torch.randn(5, 10))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 12))
    with pytest.raises(ValueError, match="model must be one of"):
        create_mil_model("transmil")
    with pytest.raises(TypeError, match="unknown MIL model options \\['depht'\\]"):
        create_mil_model("lb", depht=3)
    assert create_mil_model("abmil", in_dim=4, depth=5, rate=3).config["model"] == "abmil"  # MambaMIL-only: ignored


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_mil_model("lb", in_dim=6, drop_rate=0.0, **TINY)
    bag = torch.randn(19, 6)

    def grads():
        model.zero_grad()
        model(bag).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", [m for m in MODEL_NAMES if not m.startswith("abmil")])
def test_mambamil_initialises_every_linear_layer_as_mambamil_does(name):
    model = create_mil_model(name, in_dim=12, **TINY)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    mixers = [layer[1] for layer in model.layers]
    for mixer in mixers:
        for suffix in ("", "_b") if hasattr(mixer, "dt_proj_b") else ("",):
            dt_proj = getattr(mixer, f"dt_proj{suffix}")
            # every step size starts at softplus(0 + the xavier-initialised dt projection)
            assert torch.count_nonzero(dt_proj.bias) == 0
        weight = mixer.in_proj.weight  # xavier-normal: std sqrt(2 / (fan_in + fan_out))
        assert abs(weight.std().item() - (2 / sum(weight.shape)) ** 0.5) < 0.2 * (2 / sum(weight.shape)) ** 0.5
    kept = create_mil_model(name, in_dim=12, init="mamba", **TINY)
    dt = torch.nn.functional.softplus(kept.layers[0][1].dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # Mamba's own: log-uniform in [dt_min, dt_max]


def test_abmil_is_ungated_attention_mil_and_the_gated_one_is_kept():
    plain = create_mil_model("abmil", in_dim=12, embed_dim=16, attn_dim=8)
    assert {n for n, _ in plain.named_parameters()} == {
        "fc.0.weight", "fc.0.bias", "attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias",
        "classifier.weight", "classifier.bias"}
    assert torch.count_nonzero(plain.fc[0].bias) > 0  # PyTorch's default initialisation, not CLAM's
    assert [type(m).__name__ for m in plain.attention] == ["Linear", "Tanh", "Linear"]
    gated = create_mil_model("abmil-gated", in_dim=12, embed_dim=16, attn_dim=8)
    names = {n for n, _ in gated.named_parameters()}
    assert {"attention_a.0.weight", "attention_b.0.weight", "attention_c.weight"} <= names
    assert torch.count_nonzero(gated.fc[0].bias) == 0


@pytest.mark.parametrize("mixer,window,chunk", [("lb", "auto", 100), ("lb", 4, 13), ("mamba", 1, 7)])
def test_scan_chunks_give_the_whole_bag_result(mixer, window, chunk):
    """A bag through the mixer layers in chunks (scan state and conv look-back carried) = in one call: logits,
    attention and every gradient. 300 instances: window "auto" is 16, and chunk 100 rounds down to 96."""
    torch.manual_seed(0)
    model = create_mil_model(mixer, in_dim=6, drop_rate=0.0, window=window, **TINY).double()
    bag = torch.randn(300, 6, dtype=torch.float64)

    def run():
        model.zero_grad()
        logits, scores = model(bag, return_attention=True)
        (logits.sum() + scores.square().mean()).backward()
        return logits.detach(), scores.detach(), [p.grad.clone() for p in model.parameters()]

    whole = run()
    model.set_scan_chunk(chunk)
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    model.set_grad_checkpointing(True)  # both together
    torch.testing.assert_close(run()[0], whole[0], rtol=1e-10, atol=1e-12)


def test_scan_chunk_errors():
    with pytest.raises(ValueError, match="scan_chunk needs a one-direction mixer"):
        create_mil_model("bimamba", in_dim=6, **TINY).set_scan_chunk(64)
    with pytest.raises(ValueError, match="scan_chunk must be a positive int or None, got 0"):
        create_mil_model("lb", in_dim=6, **TINY).set_scan_chunk(0)
    create_mil_model("abmil", in_dim=6).set_scan_chunk(64)  # no mixer layers: nothing to chunk
