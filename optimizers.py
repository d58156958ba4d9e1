"""The optimizer (SGD, or Muon for the convs that a norm follows) and its one-cycle schedule."""
import numpy as np
import torch
import torch.nn.functional as F


def one_cycle(optimizer, total_steps, warmup_fraction):
    """Learning rate per step: linear from 0 up to the optimizer's lr over the
    first `warmup_fraction` of the steps, then linear down to 0 at the end."""
    points = [0, warmup_fraction * total_steps, total_steps]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(np.interp(step, points, [0.0, 1.0, 0.0])))


def orthogonalize(matrices, steps=5, one_batch=None):
    """For each matrix, roughly the nearest semi-orthogonal matrix, U V^T of its SVD U S V^T,
    by a quintic Newton-Schulz iteration (Muon's): singular values from a hundredth of the
    largest up come out between 0.6 and 1.25, close enough for an update (`Muon`).

    The matrices go through the iteration in batches. one_batch (default: on CUDA) puts
    them all in one, each zero-padded to the largest: zero rows and columns stay zero and
    leave the rest as it would be alone, and the GPU runs a few dozen kernels instead of a
    few hundred, one after another, for a matrix at a time (docs/performance.md). On the
    CPU the padding's arithmetic costs more than the calls it saves: a batch per shape.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    # Each matrix wide: the Gram matrix of the short side is the cheaper one.
    tall = [m.size(0) > m.size(1) for m in matrices]
    wide = [m.float().T if t else m.float() for m, t in zip(matrices, tall)]
    one_batch = wide[0].is_cuda if one_batch is None else one_batch
    batches = {}  # shape, or None for the one batch -> indices of its matrices
    for i, m in enumerate(wide):
        batches.setdefault(None if one_batch else m.shape, []).append(i)
    results = [None] * len(wide)
    for indices in batches.values():
        rows, cols = (max(wide[i].size(d) for i in indices) for d in (0, 1))
        x = torch.stack([F.pad(wide[i], (0, cols - wide[i].size(1), 0, rows - wide[i].size(0)))
                         for i in indices])
        x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)  # singular values now <= 1
        for _ in range(steps):
            gram = x @ x.mT
            # a x + (b gram + c gram^2) x
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, result in zip(indices, x):
            result = result[:wide[i].size(0), :wide[i].size(1)]
            results[i] = result.T if tall[i] else result
    return results


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum, and Muon (momentum orthogonalized) for the groups
    marked orthogonal=True: conv weights that a norm follows.

    A norm makes the output blind to its weight's scale, so SGD's update of such a
    weight only turns it, by an angle set by the interplay of learning rate, weight
    decay and the weight's norm. Muon holds each such weight at norm sqrt(rows) and
    turns it by orthogonalized momentum, whose singular values are all about 1: the
    learning rate is then the turn per step, the same for every direction of the
    weight, and weight decay has nothing to do there.
    """

    def __init__(self, groups, lr, momentum, weight_decay):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      orthogonal=False))

    @torch.no_grad()
    def step(self):
        # Each operation on all of a group's weights at once (torch._foreach_*, and
        # orthogonalize's batches): on a GPU each is then a kernel or two, not one a weight.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["orthogonal"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            momenta = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(momenta, group["momentum"])
            torch._foreach_add_(momenta, grads)
            updates = torch._foreach_add(grads, momenta, alpha=group["momentum"])  # Nesterov
            if group["orthogonal"]:
                for p, norm in zip(params, torch._foreach_norm(params)):
                    p.mul_(len(p) ** 0.5 / norm)
                turns = orthogonalize([u.reshape(len(u), -1) for u in updates])
                updates = [turn.reshape(p.shape) for turn, p in zip(turns, params)]
            torch._foreach_mul_(updates, group["lr"])  # a number, or a tensor (CUDA graphs)
            torch._foreach_sub_(params, updates)


OPTIMIZERS = ("sgd", "muon")


def make_optimizer(model, name, lr, momentum, weight_decay, muon_lr):
    """name "sgd": SGD with Nesterov momentum for all weights. "muon": Muon, at
    learning rate muon_lr, for the weights model.normalized_filters() names, and
    the same SGD as "sgd" for the rest."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               nesterov=momentum > 0, weight_decay=weight_decay)
    filters = model.normalized_filters()
    rest = [p for p in model.parameters() if not any(p is f for f in filters)]
    return Muon([dict(params=filters, lr=muon_lr, orthogonal=True), dict(params=rest)],
                lr=lr, momentum=momentum, weight_decay=weight_decay)
