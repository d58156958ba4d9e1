"""Is there a way of computing ghost batches that meets issue 37's 1.3x on 2 threads? Three
ways against one BN call per group (models.GhostBatchNorm2d.groups_one_by_one, the layer's
only way when this ran, at commit 6c8e9b8; "committed" below), on this CPU in bfloat16:
- fused: a kernel of our own (fused_ghost_bn.cpp, compiled at run time by
  torch.utils.cpp_extension: a C++ compiler and ninja);
- GroupNorm kernel: PyTorch's GroupNorm with one group per channel, on the groups moved
  to (groups, channels, rows), one call per layer;
- strided groups: groups of every g-th image (x[k::g]) instead of consecutive ones, whose
  channels in NCHW memory lie side by side, so one BN call on a (B, g * C, H, W) view
  normalizes them all; channels_last input is copied to NCHW and back.

    python results/speed/ghost-bn-paths/run.py > results/speed/ghost-bn-paths/results.md

Prints (1) how far each way's output, gradients and running statistics are from the
committed layer's, and (2) train.py's training step (recipe.make_step's learn on one
pre-made batch of 128 random images: no data work) with plain BN and each way, for
B = 2, 4, 8, 32: the best of 5 interleaved rounds of 15 steps, 3 such runs per thread
count, their median.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: run from anywhere
import cli  # noqa: E402
import devices  # noqa: E402
import models  # noqa: E402
import recipe  # noqa: E402

models.GhostBatchNorm2d.compiles = False  # "committed": a BN call per group, as when this ran

kernel = torch.utils.cpp_extension.load("fused_ghost_bn", [str(HERE / "fused_ghost_bn.cpp")],
                                        extra_cflags=["-O3", "-march=native"])


class FusedGhostBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        out, mean, rstd = kernel.forward(x, weight, bias, groups, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.groups = groups
        return out, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, mean, rstd, weight = ctx.saved_tensors
        return (*kernel.backward(grad_out, x, mean, rstd, weight, ctx.groups), None, None)


def unbiased_variances(rstd, eps, rows):
    """The unbiased variances of groups of `rows` values from their 1 / sqrt(var + eps)."""
    return (rstd.double().pow(-2) - eps).float() * rows / (rows - 1)


class FusedGhostBatchNorm2d(models.GhostBatchNorm2d):
    """Ghost batches through the fused kernel. bfloat16 channels_last input only
    (train.py's --amp on a CPU), in batches of whole groups of B."""

    def forward(self, x):
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        groups = len(x) // self.ghost_batch
        out, mean, rstd = FusedGhostBatchNorm.apply(x, self.weight, self.bias, groups, self.eps)
        self.track(mean, unbiased_variances(rstd, self.eps, self.ghost_batch * x[0, 0].numel()))
        return out


class GroupNormGhostBatchNorm2d(models.GhostBatchNorm2d):
    """Ghost batches through GroupNorm's kernel, one group per channel, on the groups moved
    to (groups, channels, rows). channels_last input, in batches of whole groups of B."""

    def forward(self, x):
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        n, c, h, w = x.shape
        groups, rows = n // self.ghost_batch, self.ghost_batch * h * w
        moved = x.view(groups, self.ghost_batch, c, h * w).transpose(1, 2).contiguous()
        # The native op, as F.group_norm does not return the statistics.
        out, mean, rstd = torch.native_group_norm(moved, self.weight, self.bias, groups, c, rows, c,
                                                  self.eps)
        self.track(mean.float(), unbiased_variances(rstd, self.eps, rows))
        return out.transpose(1, 2).reshape(n, c, h, w).contiguous(memory_format=torch.channels_last)


class StridedGhostBatchNorm2d(models.GhostBatchNorm2d):
    """Ghost batches of every g-th image: with g groups, group k holds images k, k + g, ...
    In NCHW memory image b * g + k's channels are channels k * C ... of image b of a
    (B, g * C, H, W) view: one BN call, with running buffers of its own at momentum 1 as
    the committed layer's. channels_last input, in batches of whole groups of B."""

    def forward(self, x):
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        n, c, h, w = x.shape
        groups = n // self.ghost_batch
        means = torch.zeros(groups * c, device=x.device)
        variances = torch.ones_like(means)
        out = F.batch_norm(x.contiguous().view(self.ghost_batch, groups * c, h, w), means, variances,
                           self.weight.repeat(groups), self.bias.repeat(groups), True, 1.0, self.eps)
        self.track(means.view(groups, c), variances.view(groups, c))
        return out.view(n, c, h, w).contiguous(memory_format=torch.channels_last)


def consecutive_order(n, bn_batch):
    """The images of a batch of n as they come: the committed layer's groups."""
    return torch.arange(n)


def strided_order(n, bn_batch):
    """The images of a batch of n reordered so that the strided groups come one after the other."""
    return torch.arange(n).view(bn_batch, -1).t().reshape(-1)


# name: (layer, the batch's order in which the layer's groups are consecutive)
WAYS = {"fused": (FusedGhostBatchNorm2d, consecutive_order),
        "GroupNorm kernel": (GroupNormGhostBatchNorm2d, consecutive_order),
        "strided groups": (StridedGhostBatchNorm2d, strided_order)}


def swap(model, way):
    """model with every GhostBatchNorm2d swapped for `way`'s layer of the same state."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is models.GhostBatchNorm2d:
                layer = WAYS[way][0](child.num_features, child.ghost_batch)
                layer.load_state_dict(child.state_dict())
                setattr(module, name, layer)
    return model


def results(layer, x, grad):
    """The layer's training output on x, gradients given the output's, running statistics."""
    torch.manual_seed(1)  # the same weights in every layer
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return [out, x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
            layer.running_var]


def check(bn_batch=2):
    """The largest differences, each way against committed (on the batch reordered so that
    the committed groups are the way's), on a (128, 64, 16, 16) batch."""
    torch.manual_seed(0)
    x = (torch.randn(128, 64, 16, 16) * 2 + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    references = {}  # order -> the committed layer's results on the batch in that order
    for order_of in dict.fromkeys(order_of for _, order_of in WAYS.values()):
        order = order_of(len(x), bn_batch)
        committed = results(models.GhostBatchNorm2d(64, bn_batch),
                            x[order].contiguous(memory_format=torch.channels_last), grad[order])
        back = torch.argsort(order)
        committed[:2] = [committed[0][back], committed[1][back]]  # output, input gradient
        references[order_of] = committed
    differences = []
    for layer, order_of in WAYS.values():
        way = results(layer(64, bn_batch), x, grad)
        differences.append([(a.float() - b.float()).abs().max()
                            for a, b in zip(way, references[order_of])])
    scale = references[consecutive_order]
    names = ["output", "input gradient", "weight gradient", "bias gradient", "running mean",
             "running var"]
    print(f"Each way against committed ghost BN, B = {bn_batch}, bfloat16 activations: the "
          "largest difference\n\n| of the layer | largest value | " + " | ".join(WAYS) + " |\n"
          "|---|---:|" + "---:|" * len(WAYS))
    for i, name in enumerate(names):
        print(f"| {name} | {scale[i].float().abs().max():.3g} | "
              + " | ".join(f"{way[i]:.3g}" for way in differences) + " |")


def default_run():
    """The run options of train.py --norm bn: the default recipe's."""
    parser = cli.Parser()
    cli.add_recipe_options(parser)
    cli.add_device_options(parser)
    args = parser.parse_args([])
    cli.resolve_device(parser, args)
    return recipe.run_options("bn", args)


def make_learner(run, way, images, labels):
    """A function timing n steps of `run`'s training step, its model fresh, its ghost
    batches computed `way` (None: committed)."""
    torch.manual_seed(0)
    model = recipe.make_model(run).to(memory_format=torch.channels_last)
    model = swap(model, way) if way else model
    step = recipe.make_step(run, model, recipe.make_optimizer(run, model), images, labels,
                            torch.Generator().manual_seed(0))
    x = images[:128].contiguous(memory_format=torch.channels_last)
    step.model.train()

    def learn(n):
        start = time.perf_counter()
        for _ in range(n):
            step.learn(x, labels[:128])
        return (time.perf_counter() - start) / n
    learn(2)  # warm-up
    return learn


def main():
    device = devices.describe(torch.device("cpu"))
    print(device.rsplit(", ", 1)[0] + "\n")  # without its thread count: both are timed
    check()
    images = torch.randn(256, 3, 32, 32)
    labels = torch.randint(0, 10, (256,))
    run = default_run()
    pipelines = {"plain": (run, None)} | {
        f"{way or 'committed'} B={b}": (run | {"bn_batch": b}, way)
        for way in (None, *WAYS) for b in (2, 4, 8, 32)}
    print("\nThe training step, median of 3 runs of the best of 5 rounds of 15 steps:\n\n"
          "| threads | pipeline | ms per step | vs plain BN |\n|---:|---|---:|---:|")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        runs = []
        for _ in range(3):
            learners = {name: make_learner(*options, images, labels)
                        for name, options in pipelines.items()}
            best = dict.fromkeys(learners, float("inf"))
            for _ in range(5):  # rounds, each pipeline in turn: the CPU's drift hits all alike
                for name, learn in learners.items():
                    best[name] = min(best[name], learn(15))
            runs.append(best)
        medians = {name: statistics.median(run[name] for run in runs) for name in pipelines}
        for name in pipelines:
            print(f"| {threads} | {name} | {medians[name] * 1000:.1f} | "
                  f"{medians[name] / medians['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
