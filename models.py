"""The CIFAR-10 network, one class for all three normalization variants.

`Net(norm)` is the network that `python train.py --norm <norm>` trains, and
`load(path)` rebuilds a trained one from its model.pt: the file names the network.

Topology: C1 C2 c3 P1 | C3 C4 C5 c6 P2 | C7 C8 C9 GAP C10
  C  = 3x3 conv block (conv, norm, ReLU or GELU)
  c  = 1x1 conv that mixes the channels before a pool
  P  = 2x2 max-pool, GAP = global average pool, C10 = 1x1 conv to the 10 logits
Skip connections: C3's output is added to C5's, C7's output to C9's.

Two kinds of 3x3 block for C3-C9 (C1 and C2 are always plain):
- "plain": a full 3x3 conv. The widths spend the parameter budget late, where the
  feature maps are small and each parameter costs little compute: 16 at 32x32,
  24 at 16x16, 36 at 8x8. c6 keeps all 24 channels: squeezing them to 16 starved
  the last stage.
- "separable": the 3x3 conv split into a depthwise 3x3 conv (one filter per
  channel) and a 1x1 pointwise conv, as in MobileNet. At C channels it costs
  9C + C*C parameters instead of 9*C*C, so the same budget buys 2.5x the width:
  64 at 16x16, 96 at 8x8.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("bn", "ln", "gn")
BLOCKS = ("plain", "separable")
BLOCKS_DEFAULT = "separable"  # why: docs/model.md
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}
# The activation after every norm, per norm: GELU helps LN and GN and costs BN
# accuracy and speed (docs/ablation.md).
ACTIVATION = {"bn": "relu", "ln": "gelu", "gn": "gelu"}

# Channels out of C1-C2, c3, C3-C5, c6 and C7-C9, for each kind of block.
WIDTHS = {"plain": (16, 16, 24, 24, 36), "separable": (16, 32, 64, 64, 96)}

# Every width of both kinds is a multiple of 4, so GroupNorm can use 4 groups
# everywhere: groups of 4-24 channels keep the group statistics stable at these widths.
GN_GROUPS = 4


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalizes bfloat16 channels_last input with groups of
    fewer than 16 channels (GN's C1 and C2) in NCHW order, then hands the result
    back in channels_last.

    PyTorch's CPU kernels for that case, the backward pass in particular, take
    several times as long as its NCHW kernels (results/speed/gn-layout/); the two copies
    cost less than the difference. Other cases run as they come.
    """

    def forward(self, x):
        small_groups = self.num_channels // self.num_groups < 16
        if not (small_groups and x.dtype == torch.bfloat16
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def make_norm(norm, channels):
    """The normalization layer for `norm` over `channels` feature maps."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return GroupNorm(GN_GROUPS, channels)
    if norm == "ln":
        # Layer norm over (C, H, W) per sample, with a per-channel affine.
        # nn.LayerNorm([C, H, W]) would learn an affine per element: C*H*W*2
        # parameters (32,768 for 16x32x32 alone), far over the 50k budget.
        return GroupNorm(1, channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias: the norm's shift replaces it), norm, activation.

    separable: a depthwise 3x3 conv then a 1x1 conv instead of one full 3x3 conv.
    activation: "relu" or "gelu" (see ACTIVATIONS).
    """

    def __init__(self, c_in, c_out, norm, separable=False, activation="relu"):
        if separable:
            convs = [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                     nn.Conv2d(c_in, c_out, 1, bias=False)]
        else:
            convs = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        super().__init__(*convs, make_norm(norm, c_out), ACTIVATIONS[activation]())


class GlobalAvgPool(nn.Module):
    """Average over all positions: (N, C, H, W) -> (N, C, 1, 1).

    nn.AdaptiveAvgPool2d(1) computes the same, but on the CPU its backward pass
    hands C7-C9 their gradients in NCHW order while their activations are
    channels_last, and PyTorch's activation backward kernels run several times
    slower on mixed layouts. avg_pool2d's backward keeps the input's layout, and
    training is faster (results/speed/gap/, docs/model.md).
    """

    def forward(self, x):
        return F.avg_pool2d(x, x.shape[-2:])


class ModelFileError(ValueError):
    """A model file that is unreadable, or not of the network it is loaded into."""


class Net(nn.Module):
    """The network. Net(norm) with no other argument is the default recipe's network;
    blocks and activation (default: ACTIVATION[norm]) choose another.

    Its state_dict carries `config` (the arguments that build it) beside the weights,
    so a saved file says what network it holds: load() rebuilds it from the file, and
    load_state_dict() refuses a file of another network instead of loading it into
    the wrong one (weights of another activation fit the same shapes).
    """

    def __init__(self, norm="bn", blocks=BLOCKS_DEFAULT, activation=None):
        super().__init__()
        activation = activation or ACTIVATION.get(norm)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if blocks not in BLOCKS:
            raise ValueError(f"unknown blocks {blocks!r}; choose one of {', '.join(BLOCKS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; "
                             f"choose one of {', '.join(ACTIVATIONS)}")
        self.config = {"norm": norm, "blocks": blocks, "activation": activation}
        w12, w_c3, w345, w_c6, w789 = WIDTHS[blocks]

        def block(c_in, c_out, separable=blocks == "separable"):
            return ConvBlock(c_in, c_out, norm, separable, activation)

        self.conv1 = block(3, w12, separable=False)
        self.conv2 = block(w12, w12, separable=False)
        self.trans3 = nn.Conv2d(w12, w_c3, 1, bias=False)  # c3
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = block(w_c3, w345)
        self.conv4 = block(w345, w345)
        self.conv5 = block(w345, w345)
        self.trans6 = nn.Conv2d(w345, w_c6, 1, bias=False)  # c6
        self.pool2 = nn.MaxPool2d(2)
        self.conv7 = block(w_c6, w789)
        self.conv8 = block(w789, w789)
        self.conv9 = block(w789, w789)
        self.gap = GlobalAvgPool()
        self.conv10 = nn.Conv2d(w789, 10, 1)

    def get_extra_state(self):
        return dict(self.config)

    def set_extra_state(self, state):
        pass  # load_state_dict checked it before loading anything

    def load_state_dict(self, state_dict, strict=True, assign=False):
        saved = state_dict.get("_extra_state")
        if saved is None and strict:
            raise ModelFileError("the file does not say which network it holds (a model.pt "
                                 "written before model files carried their config?)")
        if saved is not None and saved != self.config:
            different = ", ".join(f"{key} {saved.get(key)!r} (this network: {value!r})"
                                  for key, value in self.config.items() if saved.get(key) != value)
            raise ModelFileError(f"the weights are of another network: {different}")
        shapes = {k: v.shape for k, v in self.state_dict().items() if k != "_extra_state"}
        saved_shapes = {k: v.shape for k, v in state_dict.items() if k != "_extra_state"}
        if strict and shapes != saved_shapes:
            raise ModelFileError("the weights' names or shapes differ from this network's")
        return super().load_state_dict(state_dict, strict, assign)

    def normalized_filters(self):
        """The conv weights of C1 to C9, c3 and c6: all but C10's (the logits). Each
        feeds a norm through nothing but max-pools and other convs, which carry a change
        of the weight's scale straight through to the norm, and the norm undoes it: the
        net's output does not depend on these weights' scale. utils.Muon relies on it."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d) and m is not self.conv10]

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


def load(path, device="cpu"):
    """The trained network in `path` (a model.pt, or a run folder holding one), on
    `device`, in eval mode. Raises ModelFileError, in one line, for a missing or
    unreadable file, or one that is not a model of this project."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    try:
        state_dict = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as error:
        raise ModelFileError(f"{path} is not a readable model file "
                             f"({type(error).__name__})") from None
    config = state_dict.get("_extra_state") if isinstance(state_dict, dict) else None
    if not isinstance(config, dict) or not {"norm", "blocks", "activation"} <= config.keys():
        raise ModelFileError(f"{path} is not a model file of this project: it does not say "
                             "which network it holds")
    if not all(isinstance(value, torch.Tensor) for key, value in state_dict.items()
               if key != "_extra_state"):
        raise ModelFileError(f"{path} is not a model file of this project: not every weight "
                             "is a tensor")
    try:
        model = Net(**config)
        model.load_state_dict(state_dict)
    except (ValueError, TypeError) as error:
        raise ModelFileError(f"{path}: {error}") from None
    return model.to(device).eval()
