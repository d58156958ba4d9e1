"""One bfloat16 training step of GN's net (batch 128, channels_last, Muon, as train.py),
with models.GroupNorm and with plain nn.GroupNorm in its place, timed in one process:
best of 5 interleaved rounds of 20 steps each, so that drift hits both alike.
Run from the repository root:
    python results/speed/gn-layout/step_ab.py > results/speed/gn-layout/step.txt
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, ".")
import models  # noqa: E402
import utils  # noqa: E402

images = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last)
labels = torch.randint(0, 10, (128,))


def timer(norm_class):
    torch.manual_seed(0)
    model = models.Net("gn", "separable", activation="gelu")
    for block in model.modules():
        for name, child in block.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(block, name, norm_class(child.num_groups, child.num_channels))
    model = model.to(memory_format=torch.channels_last)
    optimizer = utils.make_optimizer(model, "muon", lr=0.01, momentum=0.95, weight_decay=5e-4,
                                     muon_lr=0.03)

    def run(steps=20):
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps * 1e3

    run(3)  # warm-up
    return run


runs = {"nn.GroupNorm": timer(nn.GroupNorm), "models.GroupNorm": timer(models.GroupNorm)}
best = dict.fromkeys(runs, float("inf"))
for _ in range(5):
    for name, run in runs.items():
        best[name] = min(best[name], run())
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
      "ms per training step of GN's net, best of 5 rounds of 20")
for name, ms in best.items():
    print(f"{name}: {ms:.1f} ms")
print(f"speed-up: {best['nn.GroupNorm'] / best['models.GroupNorm']:.2f}x")
