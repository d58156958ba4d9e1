"""Forward + backward time of one GroupNorm layer, by layout and precision (CPU).

Each GroupNorm shape of the separable net at batch 128: GN (4 groups) and LN (1 group)
after C1/C2 (16 channels at 32x32), C3-C5 (64 at 16x16) and C7-C9 (96 at 8x8). Input
and output gradient in channels_last (how the net runs on the CPU) or in NCHW, and
models.GroupNorm on channels_last input (NCHW inside where it chooses to).
Best of 5 rounds of 20 calls, the rounds interleaved so that drift hits all alike.
Run from the repository root:
    python results/speed/gn-layout/group_norm_kernels.py > results/speed/gn-layout/kernels.txt
"""
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, ".")
import models  # noqa: E402

CASES = [(channels, size, groups) for channels, size in ((16, 32), (64, 16), (96, 8))
         for groups in (4, 1)]
LAYOUTS = {"channels_last": (nn.GroupNorm, torch.channels_last),
           "NCHW": (nn.GroupNorm, torch.contiguous_format),
           "models.GroupNorm": (models.GroupNorm, torch.channels_last)}


def timer(layer_class, layout, channels, size, groups, dtype):
    torch.manual_seed(0)
    layer = layer_class(groups, channels)
    x = torch.randn(128, channels, size, size, dtype=dtype).to(memory_format=layout)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def run(calls=20):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x).backward(grad)
        return (time.perf_counter() - start) / calls * 1e3

    run(3)  # warm-up
    return run


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
      "ms per forward + backward, best of 5 rounds of 20\n")
print("| shape | groups | dtype | " + " | ".join(LAYOUTS) + " |")
print("|---|---:|---|" + "---:|" * len(LAYOUTS))
for dtype in (torch.bfloat16, torch.float32):
    for channels, size, groups in CASES:
        runs = {name: timer(cls, layout, channels, size, groups, dtype)
                for name, (cls, layout) in LAYOUTS.items()}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(5):
            for name, run in runs.items():
                best[name] = min(best[name], run())
        print(f"| 128x{channels}x{size}x{size} | {groups} | {str(dtype)[6:]} | "
              + " | ".join(f"{best[name]:.2f}" for name in LAYOUTS) + " |", flush=True)
