"""Would a fused ghost-BN kernel meet issue 37's 1.3x on 2 threads? A prototype
(fused_ghost_bn.cpp, compiled at run time by torch.utils.cpp_extension: a C++ compiler and
ninja) against models.GhostBatchNorm2d's one BN call per group, on this CPU in bfloat16.

    python results/speed/ghost-bn-fused/run.py > results/speed/ghost-bn-fused/results.md

Prints (1) how far the fused layer's output, gradients and running statistics are from
the committed layer's, and (2) train.py's training step (recipe.make_step's learn on one
pre-made batch of 128 random images: no data work) with plain BN, the committed ghost
batches and the fused ones, for B = 2, 4, 8, 32: the best of 5 interleaved rounds of 15
steps, 3 such runs per thread count, their median.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: run from anywhere
import cli  # noqa: E402
import devices  # noqa: E402
import models  # noqa: E402
import recipe  # noqa: E402

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


class FusedGhostBatchNorm2d(models.GhostBatchNorm2d):
    """models.GhostBatchNorm2d with the groups' statistics, output and gradients from the
    fused kernel; the running statistics move as the committed layer's do. A prototype:
    bfloat16 channels_last input only (train.py's --amp on a CPU), in batches of whole
    groups of B."""

    def forward(self, x):
        if not self.training or len(x) <= self.ghost_batch:
            return super().forward(x)
        groups = len(x) // self.ghost_batch
        out, mean, rstd = FusedGhostBatchNorm.apply(x, self.weight, self.bias, groups, self.eps)
        rows = self.ghost_batch * x.shape[2] * x.shape[3]
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            unbiased = (rstd.double().pow(-2) - self.eps).float() * rows / (rows - 1)
            self.running_var.lerp_(unbiased.mean(0), self.momentum)
        return out


def fuse(model):
    """model with every GhostBatchNorm2d swapped for a FusedGhostBatchNorm2d of the same state."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is models.GhostBatchNorm2d:
                fused = FusedGhostBatchNorm2d(child.num_features, child.ghost_batch)
                fused.load_state_dict(child.state_dict())
                setattr(module, name, fused)
    return model


def check(bn_batch=2):
    """The largest differences, fused against committed, on a (128, 64, 16, 16) batch."""
    torch.manual_seed(0)
    x = (torch.randn(128, 64, 16, 16) * 2 + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    layers = [models.GhostBatchNorm2d(64, bn_batch), FusedGhostBatchNorm2d(64, bn_batch)]
    results = []
    for layer in layers:
        torch.manual_seed(1)  # the same weights in both
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(grad)
        results.append([out, xi.grad, layer.weight.grad, layer.bias.grad,
                         layer.running_mean, layer.running_var])
    names = ["output", "input gradient", "weight gradient", "bias gradient", "running mean",
             "running var"]
    print(f"Fused against committed ghost BN, B = {bn_batch}, bfloat16 activations:\n\n"
          "| of the layer | largest difference | largest value |\n|---|---:|---:|")
    for name, committed, fused in zip(names, *results):
        committed, fused = committed.float(), fused.float()
        print(f"| {name} | {(fused - committed).abs().max():.3g} | {committed.abs().max():.3g} |")


def default_run():
    """The run options of train.py --norm bn: the default recipe's."""
    parser = cli.Parser()
    cli.add_recipe_options(parser)
    cli.add_device_options(parser)
    args = parser.parse_args([])
    cli.resolve_device(parser, args)
    return recipe.run_options("bn", args)


def make_learner(run, fused, images, labels):
    """A function timing n steps of `run`'s training step, its model fresh."""
    torch.manual_seed(0)
    model = recipe.make_model(run).to(memory_format=torch.channels_last)
    model = fuse(model) if fused else model
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
    pipelines = {"plain": (run, False)} | {
        f"{kind} B={b}": (run | {"bn_batch": b}, kind == "fused")
        for kind in ("committed", "fused") for b in (2, 4, 8, 32)}
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
