"""Classification pieces without a whole run: evaluation figures and model-name suggestions."""

import pytest
import torch
import torch.nn as nn

from lbmamba.engine import UserError
from lbmamba.engine.classification import evaluate_model
from lbmamba.engine.distributed import DistInfo
from lbmamba.engine.models import check_model_name, suggest_model_names


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


def _reference_groups(model, weight_decay, skip_list=("pos_embed", "cls_token")):
    """The reference code bases' rule (timm 0.4.12's `add_weight_decay`), written out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@pytest.mark.parametrize("name", ["lbvim_tiny_patch16_224", "vim_tiny_patch16_224", "lbvim_528_patch16_224_atthead"])
def test_optimizer_groups_follow_the_reference_rule(name):
    import timm

    from lbmamba.engine.optim import param_groups

    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=24, depth=2)

    def by_decay(groups):
        return {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups if g["params"]}

    assert by_decay(param_groups(model, "vim_imagenet", 0.05)) == by_decay(_reference_groups(model, 0.05))
    a_log = id(model.layers[0].mixer.A_log)
    assert a_log in by_decay(param_groups(model, "vim_imagenet", 0.05))[0.05]  # 2-d: decayed, as in the reference
    assert a_log in by_decay(param_groups(model, "vim_imagenet", 0.05, no_decay_ssm=True))[0.0]  # the option


def test_an_epoch_stepped_schedule_steps_as_the_reference_loop(tmp_path, restore_globals):
    """After epoch e (0-based) the reference loops call `lr_scheduler.step(e)`: epoch e + 1 trains at the rate
    the schedule gives e. metrics.jsonl records the rate set after each epoch."""
    import json

    from timm.scheduler import create_scheduler_v2

    from lbmamba.engine import train

    settings = dict(sched_on_updates=False, warmup_epochs=2, warmup_lr=1e-5, lr=2e-3, min_lr=1e-4, epochs=4)
    train(dict(settings, model_kwargs={"embed_dim": 16, "depth": 1, "patch_size": 8}, output=str(tmp_path / "run"),
               progress=False))
    recorded = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=settings["lr"])
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, warmup_epochs=2, warmup_lr=1e-5,
                                       min_lr=1e-4, step_on_epochs=True)
    expected = []
    for epoch in range(4):
        scheduler.step(epoch)
        expected.append(optimizer.param_groups[0]["lr"])
    assert recorded == pytest.approx(expected)
    assert recorded[0] == pytest.approx(1e-5)  # epoch 2 still trains at the warm-up's first rate
