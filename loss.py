"""Dice and Dice+BCE losses computed from logits.

Both take logits and targets of shape (N, 1, H, W) and an optional weight map of
the same shape (the FOV mask): pixels with weight 0 do not count.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DiceLoss(nn.Module):
    """1 - soft Dice over the whole batch; `smooth` keeps empty masks finite."""

    def __init__(self, smooth=1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits, targets, weight=None):
        probs = torch.sigmoid(logits)
        if weight is not None:
            probs, targets = probs * weight, targets * weight
        inter = (probs * targets).sum()
        dice = (2 * inter + self.smooth) / (probs.sum() + targets.sum() + self.smooth)
        return 1 - dice


class BCELoss(nn.Module):
    """Binary cross-entropy averaged over the counted pixels. It uses log-sum-exp
    (binary_cross_entropy_with_logits), so large logits neither overflow nor give log(0)."""

    def forward(self, logits, targets, weight=None):
        bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="sum")
        count = weight.sum() if weight is not None else torch.tensor(float(targets.numel()))
        return bce / count.clamp(min=1)


class DiceBCELoss(nn.Module):
    """Dice loss + binary cross-entropy (see BCELoss)."""

    def __init__(self, smooth=1.0, bce_weight=1.0):
        super().__init__()
        self.dice = DiceLoss(smooth)
        self.bce = BCELoss()
        self.bce_weight = bce_weight

    def forward(self, logits, targets, weight=None):
        return self.dice(logits, targets, weight) + self.bce_weight * self.bce(logits, targets, weight)


class SkeletonRecallLoss(nn.Module):
    """1 - soft recall of the vessels' tubed skeleton (Kirchhoff et al., 2024): the mean
    probability over the skeleton's pixels, so thin vessels, a few pixels of the Dice and BCE
    sums, weigh as much per unit length as wide ones. skeleton: (N, 1, H, W) in [0, 1]."""

    def forward(self, logits, skeleton):
        probs = torch.sigmoid(logits)
        return 1 - (probs * skeleton).sum() / skeleton.sum().clamp(min=1)
