"""Classification pieces without a whole run: evaluation figures and model-name suggestions."""

import pytest
import torch
import torch.nn as nn

from lbmamba.engine import UserError
from lbmamba.engine.classification import check_model_name, evaluate_model, suggest_model_names
from lbmamba.engine.distributed import DistInfo


class _Fixed(nn.Module):
    """Predicts class (pixel mean > 0) with fixed logits."""

    def forward(self, x):
        pos = (x.mean(dim=(1, 2, 3)) > 0).float()
        return torch.stack([1 - pos, pos, torch.zeros_like(pos)], dim=-1) * 5


def test_evaluate_model_figures_and_bad_samples_left_out():
    images = torch.cat([torch.ones(6, 1, 4, 4), -torch.ones(4, 1, 4, 4)])
    targets = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 1])  # 2 wrong
    bad = torch.tensor([0] * 9 + [1])  # the last one is an unreadable-image substitute
    ds = torch.utils.data.TensorDataset(images, targets, bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    out = evaluate_model(_Fixed(), loader, DistInfo())
    assert out["images"] == 9 and out["bad_images"] == 1
    assert out["top1"] == pytest.approx(100 * 8 / 9) and out["top5"] == pytest.approx(100.0)
    assert out["loss"] > 0 and out["images_per_s"] > 0


def test_unknown_model_names_get_suggestions():
    assert "lbvim_tiny_patch16_224" in suggest_model_names("lbvim_tiny_patch16")
    with pytest.raises(UserError, match="unknown model 'vim_tiny_pach16_224'; did you mean vim_tiny_patch16_224"):
        check_model_name("vim_tiny_pach16_224")
