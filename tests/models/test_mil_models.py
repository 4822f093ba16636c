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
