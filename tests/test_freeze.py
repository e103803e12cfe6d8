import torch

from dermtrain.losses import FocalLoss
from dermtrain.models import create_model, set_trainable, train_mode


def _step(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    train_mode(model)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 4, 5, 6])
    FocalLoss()(model(x), y).backward()
    opt.step()


def test_head_phase_freezes_backbone_and_trains_head():
    model = create_model("test_convnext")
    set_trainable(model, "head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model)
    after = model.state_dict()
    head_keys = [k for k in after if k.startswith("head.")]
    backbone = [k for k in after if k.startswith(("stem.", "stages."))]
    assert head_keys and backbone
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert any(not torch.equal(before[k], after[k]) for k in head_keys)


def test_last_stage_phase_unfreezes_only_the_last_stages():
    model = create_model("test_convnext")
    set_trainable(model, "last:1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model)
    after = model.state_dict()
    last = len(model.stages) - 1
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("stem.", "stages.0.")))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(f"stages.{last}."))


def test_frozen_batchnorm_keeps_running_stats():
    model = create_model("test_efficientnet")
    set_trainable(model, "head")
    before = model.bn1.running_mean.clone()
    _step(model)
    assert torch.equal(before, model.bn1.running_mean)
