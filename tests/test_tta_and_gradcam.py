"""Flip-TTA (utils.probabilities) and Grad-CAM maps (utils.grad_cam), issue 38."""
import math

import torch
import torch.nn as nn

import models
import utils


def images(count=4, seed=0):
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Flip-TTA
# ----------------------------------------------------------------------------

class MirrorSymmetric(nn.Module):
    """Logits from each channel's mean over the image: a mirror image gives the same."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, x):
        return self.linear(x.mean((2, 3)))


def test_a_mirror_symmetric_model_gets_the_same_answer_with_and_without_flip_tta():
    torch.manual_seed(0)
    model, x = MirrorSymmetric(), images(64)
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    single = utils.probabilities(model, x)
    tta = utils.probabilities(model, x, flip_tta=True)
    torch.testing.assert_close(single, tta)
    assert (single.argmax(1) == labels).sum() == (tta.argmax(1) == labels).sum()


class LooksLeft(nn.Module):
    """Logits LEFT when an image's left column is brighter than its right one, else RIGHT."""
    LEFT = torch.tensor([2.0, 0.0, 1.5] + [-9.0] * 7)
    RIGHT = torch.tensor([-4.0, 0.0, 1.5] + [-9.0] * 7)

    def forward(self, x):
        left_brighter = (x[:, :, :, 0].mean((1, 2)) > x[:, :, :, -1].mean((1, 2)))[:, None]
        return torch.where(left_brighter, self.LEFT, self.RIGHT)


def test_flip_tta_averages_the_softmax_of_the_image_and_of_its_mirror_by_hand():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[..., :16] = 200  # left half bright: the single view says class 0
    single = utils.probabilities(LooksLeft(), x)[0]
    tta = utils.probabilities(LooksLeft(), x, flip_tta=True)[0]

    def softmax(logits):
        exps = [math.exp(v) for v in logits]
        return [e / sum(exps) for e in exps]
    by_hand = [(a + b) / 2 for a, b in zip(softmax(LooksLeft.LEFT.tolist()),
                                           softmax(LooksLeft.RIGHT.tolist()))]
    assert single.argmax() == 0
    # class 0: (0.57 + 0.003) / 2 = 0.29; class 2: (0.35 + 0.81) / 2 = 0.58
    torch.testing.assert_close(tta, torch.tensor(by_hand))
    assert tta.argmax() == 2


# ----------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------

def test_a_map_has_the_images_size_is_finite_and_scaled_to_0_1():
    torch.manual_seed(0)
    model = models.Net("gn")
    maps = utils.grad_cam(model, images(4), torch.tensor([0, 3, 5, 9]))
    assert maps.shape == (4, 32, 32) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    peaks = maps.flatten(1).amax(1)
    assert all(math.isclose(p, 1.0) or p == 0 for p in peaks.tolist())


class LeftHalfOnly(nn.Module):
    """A net whose answer depends only on the left half of the image: its features on
    the right half are zeroed before the global average pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gap = models.GlobalAvgPool()
        self.head = nn.Linear(8, 10)
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :16] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.head(self.gap(torch.relu(self.conv(x)) * self.mask).flatten(1))


def test_the_maps_mass_lies_on_the_half_of_the_image_the_answer_depends_on():
    model, x = LeftHalfOnly(), images(8)
    targets = model(utils.normalize(x)).argmax(1)  # the classes it predicts
    maps = utils.grad_cam(model, x, targets)
    left = maps[..., :16].sum() / maps.sum()
    assert left > 0.9


def test_the_map_changes_when_the_weights_are_reinitialized():
    x, targets = images(4), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    trained_like = utils.grad_cam(models.Net("bn"), x, targets)
    torch.manual_seed(1)
    reinitialized = utils.grad_cam(models.Net("bn"), x, targets)
    assert (trained_like - reinitialized).abs().mean() > 0.05
