"""Where a training step's time goes, with the old GAP and the new one (torch.profiler, CPU).

One bfloat16 step of each variant on a random batch of 128, as `bench.py`'s limit does:
the ten ops with the most time of their own, over 10 steps after 5 warm-up steps.
Run from the repository root: python results/speed/gap/profile_step.py > results/speed/gap/profile.txt
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
import models  # noqa: E402

images = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last)
labels = torch.randint(0, 10, (128,))
for norm, activation in (("bn", "relu"), ("ln", "gelu"), ("gn", "gelu")):
    for gap in ("AdaptiveAvgPool2d(1)", "GlobalAvgPool"):
        torch.manual_seed(0)
        model = models.Net(norm, "separable", activation=activation)
        if gap == "AdaptiveAvgPool2d(1)":
            model.gap = nn.AdaptiveAvgPool2d(1)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(f"## {norm}, GAP = {gap}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10,
                                        max_name_column_width=40))
