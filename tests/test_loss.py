import math

import torch

from loss import DiceBCELoss, DiceLoss, SkeletonRecallLoss

BIG = 50.0  # sigmoid(50) == 1 in float32


def test_dice_perfect_and_wrong():
    t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (t * 2 - 1) * BIG
    assert DiceLoss(smooth=0)(logits, t).item() < 1e-6
    assert abs(DiceLoss(smooth=0)(-logits, t).item() - 1.0) < 1e-6


def test_dice_known_value():
    # logits 0 -> p = 0.5 everywhere; 4 pixels, 1 vessel: dice = 2*0.5 / (2 + 1) = 1/3
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = DiceLoss(smooth=0)(torch.zeros_like(t), t)
    assert abs(loss.item() - (1 - 1 / 3)) < 1e-6


def test_dicebce_known_value():
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = DiceBCELoss(smooth=0)(torch.zeros_like(t), t)
    assert abs(loss.item() - ((1 - 1 / 3) + math.log(2))) < 1e-6


def test_stable_for_huge_logits():
    t = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[-1e4, 1e4]]]], requires_grad=True)
    loss = DiceBCELoss()(logits, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() > 1000  # BCE of a confident wrong answer is ~1e4 / 2, not inf


def test_fov_weight_ignores_outside_pixels():
    t = torch.tensor([[[[1.0, 0.0, 1.0]]]])
    w = torch.tensor([[[[1.0, 1.0, 0.0]]]])
    good = torch.tensor([[[[BIG, -BIG, -BIG]]]])  # wrong only where weight is 0
    assert DiceBCELoss(smooth=0)(good, t, w).item() < 1e-6
    assert DiceBCELoss(smooth=0)(good, t).item() > 0.3


def test_bce_known_value_and_fov():
    from loss import BCELoss
    t = torch.tensor([[[[1.0, 0.0, 1.0]]]])
    w = torch.tensor([[[[1.0, 1.0, 0.0]]]])
    assert abs(BCELoss()(torch.zeros_like(t), t).item() - math.log(2)) < 1e-6
    # logit 2 on a vessel costs log(1 + e^-2); the uncounted third pixel does not matter
    logits = torch.tensor([[[[2.0, -BIG, BIG]]]])
    assert abs(BCELoss()(logits, t, w).item() - math.log1p(math.exp(-2)) / 2) < 1e-6


def test_skeleton_recall_known_values():
    """1 - mean probability over the skeleton: 0 where the net is sure of it, 1 where it misses
    it, 1/2 at logits 0; pixels off the skeleton do not count, and an empty skeleton costs 1."""
    skel = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    loss = SkeletonRecallLoss()
    assert loss(skel * BIG - (1 - skel) * BIG, skel).item() < 1e-6
    assert loss(torch.full_like(skel, BIG), skel).item() < 1e-6  # recall ignores false positives
    assert abs(loss(-skel * BIG, skel).item() - 1.0) < 1e-6
    assert abs(loss(torch.zeros_like(skel), skel).item() - 0.5) < 1e-6
    logits = torch.tensor([[[[BIG, -BIG], [3.0, -7.0]]]])
    assert abs(loss(logits, skel).item() - 0.5) < 1e-6
    assert loss(torch.zeros_like(skel), torch.zeros_like(skel)).item() == 1.0
