"""The optimizer (SGD, or Muon for the convs that a norm follows) and its one-cycle schedule."""
import numpy as np
import torch


def one_cycle(optimizer, total_steps, warmup_fraction):
    """Learning rate per step: linear from 0 up to the optimizer's lr over the
    first `warmup_fraction` of the steps, then linear down to 0 at the end."""
    points = [0, warmup_fraction * total_steps, total_steps]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(np.interp(step, points, [0.0, 1.0, 0.0])))


def orthogonalize(matrix, steps=5):
    """Roughly the nearest semi-orthogonal matrix, U V^T of matrix's SVD U S V^T, by a
    quintic Newton-Schulz iteration (Muon's): singular values from a hundredth of the
    largest up come out between 0.6 and 1.25, close enough for an update (`Muon`)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.float() / (matrix.norm() + 1e-7)  # singular values now <= 1
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # the Gram matrix of the short side is the cheaper one
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if group["orthogonal"] else p.grad.add(p, alpha=group["weight_decay"])
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                momentum.mul_(group["momentum"]).add_(grad)
                update = grad.add(momentum, alpha=group["momentum"])  # Nesterov
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalize(update.reshape(len(p), -1)).view_as(p)
                p.sub_(update * group["lr"])  # lr: a number, or a tensor (CUDA graphs)


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
