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
import contextlib
import functools
import warnings
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
# The group-count study (docs/norm-studies.md) varies it: any count that divides every
# width, or PER_CHANNEL, one group per channel (InstanceNorm with a per-channel affine).
GN_GROUPS = 4
PER_CHANNEL = "channel"


def check_gn_groups(groups, blocks=BLOCKS_DEFAULT):
    """ValueError unless `groups` (a count, or PER_CHANNEL) divides every width of `blocks`."""
    if groups == PER_CHANNEL:
        return
    widths = sorted(set(WIDTHS[blocks]))
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or any(
            width % groups for width in widths):
        raise ValueError(f"GroupNorm's group count must divide every width "
                         f"({', '.join(map(str, widths))}), or be {PER_CHANNEL!r}; got {groups!r}")


def group_rows(x, ghost_batch):
    """(N, C, H, W) -> (N / ghost_batch, ghost_batch * H * W, C): each group of `ghost_batch`
    images as rows of channels, as BN's channels_last kernel reads them (a view there)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n // ghost_batch, ghost_batch * h * w, c)


def ungroup_rows(rows, like):
    """group_rows's inverse: a tensor of the shape and memory format of `like`."""
    n, c, h, w = like.shape
    memory_format = (torch.channels_last if like.is_contiguous(memory_format=torch.channels_last)
                     else torch.contiguous_format)
    out = rows.to(like.dtype).view(n, h, w, c).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=memory_format)


def ghost_batch_norm_forward(x, weight, bias, ghost_batch: int, eps: float):
    """BatchNorm's training output for each group of `ghost_batch` images of x, from the
    group's own statistics, in float32; with each group's mean, 1 / sqrt(variance + eps)
    and (biased) variance, (groups, 1, C) each.

    Compiled, the statistics come out as they are: with 1 / sqrt(...) not returned, or
    returned squeezed, the output's loop computed it again for every value, which made
    the forward pass 40% slower (torch 2.14, this CPU, on the layer alone)."""
    groups = group_rows(x, ghost_batch).float()
    variance, mean = torch.var_mean(groups, dim=1, keepdim=True, correction=0)
    rstd = torch.rsqrt(variance + eps)
    out = (groups - mean) * (rstd * weight) + bias
    return ungroup_rows(out, x), mean, rstd, variance


def ghost_batch_norm_backward(grad_out, x, weight, mean, rstd, ghost_batch: int):
    """The gradients of ghost_batch_norm_forward's output with respect to x, weight and
    bias: BatchNorm's backward pass within each group."""
    groups, grads = group_rows(x, ghost_batch).float(), group_rows(grad_out, ghost_batch).float()
    x_hat = (groups - mean) * rstd
    grad_sum = grads.sum(1, keepdim=True)
    grad_x_hat_sum = (grads * x_hat).sum(1, keepdim=True)
    grad_x = (grads - (grad_sum + x_hat * grad_x_hat_sum) / groups.shape[1]) * (rstd * weight)
    return ungroup_rows(grad_x, x), grad_x_hat_sum.sum((0, 1)), grad_sum.sum((0, 1))


@functools.cache
def compiled(function):
    """`function` through torch.compile, which fuses its tensor operations into a kernel or
    two, each shape of input compiled apart for the fastest kernels. Made on first use:
    importing torch.compile's machinery takes seconds."""
    # A training run sees a few shapes, bench.py's ghost batches a dozen, past torch's
    # default limit of 8 per function, past which fullgraph raises. Set for the process:
    # patching it around each call cost 0.14 ms, 2 ms a step.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(function, dynamic=False, fullgraph=True)


class GhostBatchNormFunction(torch.autograd.Function):
    """Ghost batch norm over whole groups of images: its output and each group's mean and
    variance, each direction one compiled function."""

    @staticmethod
    def forward(ctx, x, weight, bias, ghost_batch, eps):
        forward = compiled(ghost_batch_norm_forward)
        out, mean, rstd, variance = forward(x, weight, bias, ghost_batch, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.ghost_batch = ghost_batch
        ctx.mark_non_differentiable(mean, variance)
        return out, mean, variance

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_variance):
        grads = compiled(ghost_batch_norm_backward)(grad_out, *ctx.saved_tensors, ctx.ghost_batch)
        return *grads, None, None


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of groups of `ghost_batch` images
    of each batch, not of the whole batch: BN as it runs on devices that each hold
    `ghost_batch` images while the optimizer steps on all of them ("ghost batches",
    Hoffer et al. 2017). A batch of at most `ghost_batch` images is plain BN, bit for
    bit; a batch that does not split evenly (an epoch's last) ends in a smaller group.
    The running statistics move towards the groups' mean statistics. Evaluation uses the
    running statistics, as plain BN does.

    The groups go through GhostBatchNormFunction, compiled, which costs about what plain
    BN does. Where torch.compile fails (it needs a C++ compiler for a CPU, Triton for
    CUDA), each group goes through BN's own kernel, as does an uneven batch's last group:
    the same numbers to rounding, but a call per group, whose fixed costs made B = 2 1.78x
    plain BN's step on 2 threads (results/speed/ghost-bn-paths/results.md, "committed").
    """
    compiles = True  # until torch.compile fails in this process

    def __init__(self, channels, ghost_batch):
        super().__init__(channels)
        self.ghost_batch = ghost_batch

    def forward(self, x):
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        uneven = len(x) % self.ghost_batch
        if not uneven:
            out, means, variances = self.compiled_groups(x) or self.groups_one_by_one(x)
        else:
            # x.split, not x[:n]: a slice's gradient is a copy, into NCHW, which the
            # convolution before then copies back (a tenth of B = 8's step on 1 thread).
            whole, last = x.split(len(x) - uneven)
            parts = [self.compiled_groups(whole) or self.groups_one_by_one(whole),
                     self.groups_one_by_one(last)]
            out, means, variances = (torch.cat(part) for part in zip(*parts))
        self.track(means, variances)
        return out

    def compiled_groups(self, x):
        """(output, groups' means, groups' unbiased variances) of x, whole groups of
        ghost_batch images, through GhostBatchNormFunction; None where it does not compile."""
        if not GhostBatchNorm2d.compiles:
            return None
        try:
            out, means, variances = GhostBatchNormFunction.apply(x, self.weight, self.bias,
                                                                 self.ghost_batch, self.eps)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            warnings.warn(f"ghost batches run a BN call per group, slower: torch.compile failed: "
                          f"{str(error).splitlines()[0]}")
            GhostBatchNorm2d.compiles = False
            return None
        rows = self.ghost_batch * x[0, 0].numel()
        return out, means.flatten(1), variances.flatten(1) * rows / (rows - 1)

    def groups_one_by_one(self, x):
        """compiled_groups's results, a last group of fewer images allowed, through BN's
        own kernel: a call per group, with running buffers of its own at momentum 1, which
        then hold the group's statistics."""
        groups = x.split(self.ghost_batch)
        means = torch.zeros(len(groups), self.num_features, device=x.device)
        variances = torch.ones_like(means)
        out = torch.cat([
            F.batch_norm(group, mean, variance, self.weight, self.bias, True, 1.0, self.eps)
            for group, mean, variance in zip(groups, means, variances)])
        return out, means, variances

    def track(self, means, variances):
        """Move the running statistics towards the groups' mean statistics: means and
        (unbiased) variances hold one group's per row."""
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(means.mean(0), self.momentum)
            self.running_var.lerp_(variances.mean(0), self.momentum)


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


def make_norm(norm, channels, gn_groups=GN_GROUPS, bn_batch=None):
    """The normalization layer for `norm` over `channels` feature maps. gn_groups: GN's
    group count or PER_CHANNEL; bn_batch: BN's statistics batch (None: the whole batch)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels) if bn_batch is None else GhostBatchNorm2d(channels, bn_batch)
    if norm == "gn":
        return GroupNorm(channels if gn_groups == PER_CHANNEL else gn_groups, channels)
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

    def __init__(self, c_in, c_out, norm, separable=False, activation="relu", **norm_options):
        if separable:
            convs = [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
                     nn.Conv2d(c_in, c_out, 1, bias=False)]
        else:
            convs = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        super().__init__(*convs, make_norm(norm, c_out, **norm_options), ACTIVATIONS[activation]())


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
    blocks and activation (default: ACTIVATION[norm]) choose another, and so do
    gn_groups (GN only: GN_GROUPS by default) and bn_batch (BN only: the statistics
    batch of GhostBatchNorm2d; None, the whole batch, by default).

    Its state_dict carries `config` (the arguments that build it) beside the weights,
    so a saved file says what network it holds: load() rebuilds it from the file, and
    load_state_dict() refuses a file of another network instead of loading it into
    the wrong one (weights of another activation fit the same shapes).
    """

    def __init__(self, norm="bn", blocks=BLOCKS_DEFAULT, activation=None, gn_groups=None,
                 bn_batch=None):
        super().__init__()
        activation = activation or ACTIVATION.get(norm)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        if gn_groups is not None and norm != "gn":
            raise ValueError("gn_groups is GroupNorm's option; this network is of norm " + norm)
        if bn_batch is not None and (norm != "bn" or not isinstance(bn_batch, int) or bn_batch < 1):
            raise ValueError(f"bn_batch must be a positive count, of BatchNorm only; got {bn_batch!r}")
        if blocks not in BLOCKS:
            raise ValueError(f"unknown blocks {blocks!r}; choose one of {', '.join(BLOCKS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; "
                             f"choose one of {', '.join(ACTIVATIONS)}")
        if gn_groups is not None:
            check_gn_groups(gn_groups, blocks)
        # The norm's options only where set, so that the default network's config (and
        # every model file written before the options existed) stays as it was.
        self.config = {"norm": norm, "blocks": blocks, "activation": activation} | {
            key: value for key, value in (("gn_groups", gn_groups), ("bn_batch", bn_batch))
            if value is not None and not (key == "gn_groups" and value == GN_GROUPS)}
        w12, w_c3, w345, w_c6, w789 = WIDTHS[blocks]
        norm_options = {"gn_groups": gn_groups or GN_GROUPS, "bn_batch": bn_batch}

        def block(c_in, c_out, separable=blocks == "separable"):
            return ConvBlock(c_in, c_out, norm, separable, activation, **norm_options)

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


@contextlib.contextmanager
def batch_statistics(model):
    """Within it, the model's BN layers normalize with the statistics of each batch they
    see, in evaluation mode too, instead of their running averages, which stay as they
    were: BN's dependence on its batch at test time. (BatchNorm uses batch statistics
    where it has no running buffers.)"""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.running_mean, m.running_var) for m in layers]
    for m in layers:
        m.running_mean = m.running_var = None
    try:
        yield model
    finally:
        for m, (mean, var) in zip(layers, saved):
            m.running_mean, m.running_var = mean, var


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
