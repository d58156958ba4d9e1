"""Operations (aten calls, each a kernel launch on a GPU) of one training step of Net(norm)
with the recipe's Muon, split into forward + backward and the optimizer's step.

    PYTHONPATH=. python results/speed/optimizer-ops/count.py [--one-batch]

(from the root of the checkout whose code it counts).

--one-batch: orthogonalize all matrices in one padded batch, as optimizers.orthogonalize
does on CUDA (by default on the CPU: a batch per shape). Views are not counted: they launch
nothing.
"""
import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
import optimizers
import recipe

VIEWS = {"detach", "view", "_unsafe_view", "t", "transpose", "expand", "permute", "slice",
         "select", "alias", "unsqueeze", "squeeze", "reshape", "unbind", "split"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


if "--one-batch" in sys.argv:
    optimizers.orthogonalize = functools.partial(optimizers.orthogonalize, one_batch=True)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
for norm in models.NORMS:
    torch.manual_seed(0)
    model = models.Net(norm)
    optimizer = optimizers.make_optimizer(model, "muon", recipe.LR, recipe.MOMENTUM[norm],
                                          recipe.WEIGHT_DECAY, recipe.MUON_LR[norm])
    for _ in range(2):  # the second step: the momentum buffers exist
        learn, update = Count(), Count()
        with learn:
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with update:
            optimizer.step()
    print(f"{norm}: forward + backward {learn.calls}, optimizer step {update.calls}")
