"""The CIFAR-10 network, one class for all three normalization variants.

Topology: C1 C2 c3 P1 | C3 C4 C5 c6 P2 | C7 C8 C9 GAP C10
  C  = 3x3 conv block (conv, norm, ReLU, optional dropout)
  c  = 1x1 conv that mixes the channels before a pool
  P  = 2x2 max-pool, GAP = global average pool, C10 = 1x1 conv to the 10 logits
Skip connections: C3's output is added to C5's, C7's output to C9's.
The widths spend the parameter budget late, where the feature maps are small
and each parameter costs little compute: 16 at 32x32, 24 at 16x16, 36 at 8x8.
c6 keeps all 24 channels: squeezing them to 16 starved the last stage.
"""
import torch.nn as nn

NORMS = ("bn", "ln", "gn")

# Every width is a multiple of 4, so GroupNorm can use 4 groups everywhere:
# 4-9 channels per group keep the group statistics stable at these small widths.
GN_GROUPS = 4


def make_norm(norm, channels):
    """The normalization layer for `norm` over `channels` feature maps."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(GN_GROUPS, channels)
    if norm == "ln":
        # Layer norm over (C, H, W) per sample, with a per-channel affine.
        # nn.LayerNorm([C, H, W]) would learn an affine per element: C*H*W*2
        # parameters (32,768 for 16x32x32 alone), far over the 50k budget.
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias: the norm's shift replaces it), norm, ReLU, dropout."""

    def __init__(self, c_in, c_out, norm, dropout):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                  make_norm(norm, c_out), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Net(nn.Module):
    def __init__(self, norm="bn", dropout=0.0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.norm = norm

        def block(c_in, c_out):
            return ConvBlock(c_in, c_out, norm, dropout)

        self.conv1 = block(3, 16)
        self.conv2 = block(16, 16)
        self.trans3 = nn.Conv2d(16, 16, 1, bias=False)  # c3
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = block(16, 24)
        self.conv4 = block(24, 24)
        self.conv5 = block(24, 24)
        self.trans6 = nn.Conv2d(24, 24, 1, bias=False)  # c6
        self.pool2 = nn.MaxPool2d(2)
        self.conv7 = block(24, 36)
        self.conv8 = block(36, 36)
        self.conv9 = block(36, 36)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv10 = nn.Conv2d(36, 10, 1)

    def forward(self, x):
        x = self.pool1(self.trans3(self.conv2(self.conv1(x))))
        x = self.conv3(x)
        x = x + self.conv5(self.conv4(x))  # skip: C3's output added to C5's
        x = self.pool2(self.trans6(x))
        x = self.conv7(x)
        x = x + self.conv9(self.conv8(x))  # skip: C7's output added to C9's
        return self.conv10(self.gap(x)).flatten(1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
