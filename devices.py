"""Device policy: the memory layout, precision, CUDA graphs and evaluation batch size
that suit a device, and how to name it in a run's record."""
import platform

import torch


def memory_format(device):
    """The layout of the model and its input on `device`.

    channels_last makes the convolutions faster on the CPU (bench.py's limit rows,
    docs/performance.md). On CUDA NCHW was faster: PyTorch's GroupNorm (LN and GN
    here) works in NCHW only there and copies channels_last input into it
    (docs/history.md names the commit with those runs).
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def autocast(device, enabled):
    """bfloat16 mixed precision when enabled: no loss scaling needed, unlike fp16.

    No cache of the weights' bfloat16 copies: CUDA graph capture does not allow
    one, and each weight is used once per forward pass, so it saves nothing.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def processor_name(device):
    """What `device` is, for the record: e.g. "AMD EPYC (family 26, model 2)" or
    "NVIDIA H100 80GB HBM3".

    Timings and the bfloat16 default depend on it, and the same 2-core machine
    has not always had the same processor. Some hosts give the CPU's brand only
    ("AMD EPYC"), so its family and model are added: they tell generations apart.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first_cpu = cpuinfo.read().split("\n\n")[0]
    except OSError:
        first_cpu = ""
    fields = dict(map(str.strip, line.split(":", 1)) for line in first_cpu.splitlines() if ":" in line)
    if "model name" not in fields:
        return platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    return fields["model name"]


def describe(device):
    """One line for logs: device, processor, torch version and CPU threads."""
    threads = torch.get_num_threads()
    return (f"{device} ({processor_name(device)}), torch {torch.__version__}, "
            f"{threads} thread{'s' if threads != 1 else ''}")


def use_amp(requested, device):
    """Whether to train in bfloat16 mixed precision on `device`: as --amp
    requested, or by default (None) where that is faster.

    Measured (docs/performance.md): faster for all three variants on CPUs with
    AVX-512 bfloat16 instructions, where oneDNN runs the convolutions in bfloat16:
    an Intel Xeon with AMX matrix units and an AMD EPYC without them; slower on an
    H200, where this small net's step waits on kernel launches and autocast only
    adds casts. Other CPUs stay in float32: they have no bfloat16 arithmetic.
    """
    if requested is not None:
        return requested
    # torch has no public test for the instructions; a torch without this private
    # one trains in float32, which is never wrong, only slower.
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return device.type == "cpu" and has_bf16()


def use_cuda_graph(requested, device, compiled):
    """Whether to capture each training step as a CUDA graph: as --cuda-graph
    requested, or by default (None) on CUDA unless the model is compiled (the two
    do not combine). Graphs made the full run about 3x faster on an H200, at the
    same accuracy (docs/performance.md, "On a GPU").
    """
    if requested is not None:
        return requested
    return device.type == "cuda" and not compiled


def eval_batch_size(device):
    """Images per batch when evaluating on `device`.

    On the CPU, batches of 250 keep their activations in the caches and evaluate
    faster than batches of 1,000 (bench.py's eval rows, docs/performance.md). On
    CUDA, 1,000 makes fewer launches.
    """
    return 250 if torch.device(device).type == "cpu" else 1000
