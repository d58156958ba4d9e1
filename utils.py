"""Data loading, batched augmentation, train/test loops, checkpoints and plots.

Nothing here knows about the command line: every function takes what it
needs as arguments. train.py is the front end.
"""
import collections
import hashlib
import os
import platform
import random
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the official CIFAR-10 training set.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class UserError(Exception):
    """A problem the user can fix (bad data, bad path, bad checkpoint).

    train.py prints it as one line and exits with code 2.
    """


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------
# Data: CIFAR-10 as uint8 tensors, decoded once and cached
# ----------------------------------------------------------------------------

def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar-norms"


def load_cifar10(data_dir, cache_dir, download=True):
    """Both splits as {"train": (images, labels), "test": (...), "source": ..., "eval_split": "test"}.

    images: uint8 (N, 3, 32, 32), labels: int64 (N,), CIFAR-10's class order.
    `data_dir` holds either an image folder (train/<class>/*, test/<class>/*)
    or torchvision's CIFAR10 files (downloaded there when absent).
    """
    data_dir = Path(data_dir)
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        data = {split: _cached(data_dir / split, cache_dir, partial(_read_image_folder, data_dir / split))
                for split in ("train", "test")}
        return {**data, "source": f"image folder {data_dir}", "eval_split": "test"}
    _ensure_torchvision_files(data_dir, download)
    data = {split: _cached(data_dir / "cifar-10-batches-py", cache_dir,
                           partial(_read_torchvision, data_dir, split == "train"), split)
            for split in ("train", "test")}
    return {**data, "source": f"torchvision CIFAR10 {data_dir}", "eval_split": "test"}


def hold_out(data, count):
    """Split `count` training images off as the evaluation set, in place of the test set.

    The held-out images are drawn with a fixed seed, so every run compares on
    the same validation images whatever its --seed.
    """
    images, labels = data["train"]
    if not 0 < count < len(labels):
        raise UserError(f"cannot hold out {count} of {len(labels)} training images; "
                        f"choose between 1 and {len(labels) - 1}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, held_out = order[count:].sort().values, order[:count].sort().values
    return {"train": (images[train], labels[train]), "test": (images[held_out], labels[held_out]),
            "source": f"{data['source']}, {count} training images held out",
            "eval_split": "validation"}


def _cached(folder, cache_dir, read, name=None):
    """read(), cached in cache_dir until the listing of `folder` changes.

    The signature is the modification time and entry count of `folder` and of
    each folder in it: adding, removing or renaming files changes it.
    Editing a file in place does not; delete the cache to force a re-read.
    """
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: an image-folder data set needs both "
                        "train/<class>/ and test/<class>/")
    signature = [(p.name, p.stat().st_mtime_ns, len(os.listdir(p)))
                 for p in sorted([folder, *folder.iterdir()]) if p.is_dir()]
    name = name or folder.name
    digest = hashlib.sha1(f"{folder.resolve()}|{name}".encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"{name}-{digest}.pt"
    if cache_file.exists():
        try:
            cached = torch.load(cache_file, weights_only=True)
            if cached["signature"] == signature:
                return cached["images"], cached["labels"]
        except Exception:
            pass  # an unreadable cache is rebuilt below
    images, labels = read()
    try:
        atomic_save({"signature": signature, "images": images, "labels": labels}, cache_file)
    except OSError as error:
        print(f"warning: could not write the data cache {cache_file}: {error.strerror}")
    return images, labels


def _read_image_folder(split_dir):
    """Decode split_dir/<class>/* into uint8 tensors.

    Hidden files are ignored. Files that are not images (or are corrupt) are
    skipped with a warning naming them; images that are not 32x32 RGB mean
    this is the wrong data set, and stop with an error.
    """
    folders = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if missing := sorted(set(CLASSES) - folders):
        raise UserError(f"{split_dir} has no folder for class(es) {', '.join(missing)}; "
                        f"expected one folder per CIFAR-10 class: {', '.join(CLASSES)}")
    if extra := sorted(folders - set(CLASSES)):
        raise UserError(f"{split_dir} has unexpected folder(s) {', '.join(extra)}; "
                        f"expected only the CIFAR-10 classes: {', '.join(CLASSES)}")
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        class_files = sorted(p for p in (split_dir / name).iterdir()
                             if p.is_file() and not p.name.startswith("."))
        if not class_files:
            raise UserError(f"{split_dir / name} has no images")
        files += class_files
        labels += [label] * len(class_files)

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        decoded = list(tqdm(pool.map(_decode_image, files), total=len(files),
                            desc=f"decoding {split_dir}", disable=None, leave=False))
    unreadable = [str(f) for f, image in zip(files, decoded) if image is None]
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        print(f"warning: skipped {len(unreadable)} file(s) that are not readable images: {shown}")
    kept = [i for i, image in enumerate(decoded) if image is not None]
    if not kept:
        raise UserError(f"{split_dir} has no readable images")
    images = torch.from_numpy(np.stack([decoded[i] for i in kept])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([labels[i] for i in kept])


def _decode_image(path):
    """One image as a (32, 32, 3) uint8 array; None if the file is no image."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            if image.size != (32, 32) or image.mode != "RGB":
                raise UserError(f"{path} is a {image.size[0]}x{image.size[1]} {image.mode} image; "
                                "CIFAR-10 images must be 32x32 RGB")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _ensure_torchvision_files(data_dir, download):
    """Make sure torchvision's CIFAR10 files are in data_dir, downloading if allowed."""
    if (data_dir / "cifar-10-batches-py").is_dir():
        return
    help_text = ("put CIFAR-10 there (torchvision's cifar-10-python.tar.gz, or an image folder "
                 "with train/<class>/ and test/<class>/), or pass --data-dir with the data")
    if not download:
        raise UserError(f"no CIFAR-10 data in {data_dir}: {help_text}")
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(data_dir, train=True, download=True)
    except Exception as error:
        raise UserError(f"no CIFAR-10 data in {data_dir} and the download failed "
                        f"({type(error).__name__}: {error}); {help_text}") from None


def _read_torchvision(data_dir, train):
    from torchvision.datasets import CIFAR10
    try:
        dataset = CIFAR10(data_dir, train=train, download=False)
    except Exception as error:
        raise UserError(f"could not read CIFAR-10 from {data_dir} ({error}); "
                        "delete the folder cifar-10-batches-py there to download it again") from None
    if list(dataset.classes) != list(CLASSES):
        raise UserError(f"unexpected classes in {data_dir}: {dataset.classes}")
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets)


# ----------------------------------------------------------------------------
# Augmentation, on whole batches on the training device
# ----------------------------------------------------------------------------

def memory_format(device):
    """The layout of the model and its input on `device`.

    channels_last makes the convolutions about 1.5x faster on the CPU (bench.py).
    On CUDA, NCHW made the full run with --cuda-graph 59 s instead of 70 s on an
    H200 (README, "On a GPU"): PyTorch's GroupNorm (LN and GN here) works in NCHW
    only there and copies channels_last input into it.
    """
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def normalize(images):
    """uint8 (N, 3, H, W) -> float, per-channel standardized, in the device's memory_format."""
    mean, std = _channel_stats(images.device)
    x = (images.float() / 255 - mean) / std
    return x.contiguous(memory_format=memory_format(images.device))


@cache
def _channel_stats(device):
    """MEAN and STD as (1, 3, 1, 1) tensors on `device`, made once: a copy from
    the host per batch would cost a transfer each, and a captured CUDA graph
    cannot copy from the host at all."""
    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (MEAN, STD))


def augment(images, generator, translate=4, cutout=0):
    """Random translate, horizontal flip and cutout of each image of a batch.

    Translation reflects at the border, as reflect padding would. Translate
    and flip are one gather of pixel indices, so the batch is copied once;
    cutout fills a square with the mean colour. Every image gets its own
    random draw from `generator`.
    """
    n, _, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if translate:
        shift = torch.randint(-translate, translate + 1, (2, n, 1), generator=generator, device=device)
        rows, cols = _reflect(rows + shift[0], h), _reflect(cols + shift[1], w)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5
    cols = torch.where(flip, w - 1 - cols, cols)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (n, h, w, c), i.e. channels_last.
    images = images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if cutout:
        # A cutout x cutout square centred anywhere, so it may lie partly outside.
        centre = torch.randint(0, h, (2, n, 1), generator=generator, device=device)
        offset = torch.arange(h, device=device) - centre + cutout // 2  # 2, n, h
        inside = (offset >= 0) & (offset < cutout)
        hole = (inside[0][:, :, None] & inside[1][:, None, :])[:, None]
        mean_colour = (_channel_stats(device)[0] * 255).round().to(images.dtype)
        images = torch.where(hole, mean_colour, images)
    return images


def _reflect(index, size):
    """Map indices outside 0..size-1 back inside, mirroring at the edges."""
    index = index.abs()
    return (size - 1) - ((size - 1) - index).abs()


# ----------------------------------------------------------------------------
# Train and test loops
# ----------------------------------------------------------------------------

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

    Measured (README, "Performance"): faster for all three variants on CPUs with
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
    do not combine). Measured (README, "On a GPU"): the full run in 52-59 s on an
    H100; 59 s against 176 s eager on an H200; the same accuracy within noise.
    """
    if requested is not None:
        return requested
    return device.type == "cuda" and not compiled


def one_cycle(optimizer, total_steps, warmup_fraction=0.25):
    """Learning rate per step: linear from 0 up to the optimizer's lr over the
    first quarter of the steps, then linear down to 0 at the end."""
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


class TrainStep:
    """One optimizer step on the training images at the given indices: augment, forward,
    backward, update. Returns (loss, number correct), tensors on the device.

    cuda_graph: capture the step as a CUDA graph, one per batch length, and replay
    it. An eager step of this small net is hundreds of tiny kernels that Python
    launches one at a time, and the GPU waits for them (README, "On a GPU"); a
    replay launches them all in one call. A replay repeats the captured kernels on
    the same memory, so the batch's indices are copied into the graph's own index
    tensor, and the learning rate lives on the device (see below).
    """
    WARMUP_STEPS = 3  # eager steps per batch length before capturing it

    def __init__(self, model, optimizer, images, labels, generator, label_smoothing=0.0,
                 augmentation=None, amp=False, cuda_graph=False):
        self.model, self.optimizer = model, optimizer
        self.images, self.labels, self.generator = images, labels, generator
        self.label_smoothing, self.augmentation, self.amp = label_smoothing, augmentation or {}, amp
        self.cuda_graph = cuda_graph
        self.graphs = {}  # batch length -> (graph, its index tensor, its outputs)
        self.eager_steps = collections.Counter()  # batch length -> steps run eagerly
        for group in optimizer.param_groups:
            # A graph would replay the learning rate it was captured with, were it a
            # number. As a tensor on the device, the scheduler updates it in place
            # and the fused SGD kernel reads it there. A checkpoint from either
            # kind of run comes back in either form.
            lr = float(group["lr"])
            group.update(lr=torch.tensor(lr, device=images.device) if cuda_graph else lr,
                         fused=cuda_graph or None)

    def step(self, index):
        x = normalize(augment(self.images[index], self.generator, **self.augmentation))
        y = self.labels[index]
        with autocast(self.images.device, self.amp):
            output = self.model(x)
            loss = F.cross_entropy(output, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (output.argmax(1) == y).sum()

    def __call__(self, index):
        if not self.cuda_graph:
            return self.step(index)
        if not all(isinstance(group["lr"], torch.Tensor) for group in self.optimizer.param_groups):
            raise RuntimeError("the learning-rate scheduler replaced the lr tensor instead of "
                               "updating it: this torch is too old for CUDA graphs here")
        n = len(index)
        if self.eager_steps[n] < self.WARMUP_STEPS:
            # Capture needs a few eager steps first, on a side stream: cuDNN
            # picks its algorithms, SGD makes its momentum buffers.
            self.eager_steps[n] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(index)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if n not in self.graphs:
            graph_index = index.clone()
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)  # fresh augmentation each replay
            with torch.cuda.graph(graph):
                outputs = self.step(graph_index)
            self.graphs[n] = graph, graph_index, outputs
        graph, graph_index, outputs = self.graphs[n]
        graph_index.copy_(index)
        graph.replay()
        return outputs


def train(step, scheduler, batch_size, desc="train"):
    """One epoch of `step` (a TrainStep) over its training images in a random order.

    Returns (loss, accuracy) averaged over the epoch's augmented batches.
    Raises NonFiniteLoss naming the first batch whose loss was NaN or infinite.
    """
    step.model.train()
    n = len(step.labels)
    device = step.labels.device
    order = torch.randperm(n, generator=step.generator, device=device)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    finite = []  # checked after the epoch: a check per batch would sync the GPU
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=None, leave=False):
        index = order[start:start + batch_size]
        loss, batch_correct = step(index)
        scheduler.step()
        finite.append(torch.isfinite(loss))
        total_loss += loss * len(index)
        correct += batch_correct
    bad_batches = (~torch.stack(finite)).nonzero()
    if len(bad_batches):
        raise NonFiniteLoss(f"batch {bad_batches[0].item() + 1} of {len(finite)}")
    return total_loss.item() / n, correct.item() / n


def eval_batch_size(device):
    """Images per batch when evaluating on `device`.

    On the CPU, batches of 250 keep their activations in the caches: evaluation
    took 1.7-2.6x less time than in batches of 1,000 (bench.py's eval rows). On
    CUDA, 1,000 makes fewer launches.
    """
    return 250 if torch.device(device).type == "cpu" else 1000


@torch.inference_mode()
def test(model, images, labels, batch_size=None, amp=False):
    """(loss, accuracy, predictions) of the model on uint8 images, no augmentation,
    in batches of `batch_size` (default: eval_batch_size of the images' device)."""
    batch_size = batch_size or eval_batch_size(images.device)
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    predictions = []
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size])
        with autocast(images.device, amp):
            output = model(x)
        total_loss += F.cross_entropy(output.float(), labels[start:start + batch_size], reduction="sum")
        predictions.append(output.argmax(1))
    predictions = torch.cat(predictions)
    accuracy = (predictions == labels).float().mean().item()
    return total_loss.item() / len(labels), accuracy, predictions


# ----------------------------------------------------------------------------
# Reproducibility and checkpoints
# ----------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states(generator):
    """Every random state a run draws from, to store in a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "augment": generator.get_state()}


def set_rng_states(states, generator):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    generator.set_state(states["augment"])


def _replace_atomically(path, write):
    """write(temporary path), then rename it to `path`: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save `obj` to `path`, atomically."""
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text, path):
    """Write `text` to `path`, atomically: metrics.json marks a finished run."""
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} to resume from") from None
    except Exception as error:
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}); "
                        "delete it and start the run again without --resume") from None


# ----------------------------------------------------------------------------
# Plots (matplotlib, no display needed)
# ----------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Save a figure to `path` atomically (a stop mid-write keeps the old figure), in the
    format its suffix names, and close it."""
    path = Path(path)
    try:
        _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix[1:]))
    finally:
        _pyplot().close(fig)


def plot_curves(metrics, path):
    """Loss and accuracy per epoch, train and test, for one model."""
    plt = _pyplot()
    epochs = range(1, len(metrics["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    eval_split = metrics["eval_split"]
    for split, label in (("train", "train (augmented)"), ("test", eval_split)):
        ax_loss.plot(epochs, metrics[f"{split}_loss"], marker=".", label=label)
        ax_acc.plot(epochs, [100 * a for a in metrics[f"{split}_acc"]], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (train: with label smoothing)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    _style(ax_loss, ax_acc)
    fig.suptitle(f"{metrics['norm'].upper()}: {metrics['params']:,} parameters")
    save_figure(fig, path)


def _style(*axes):
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()


def plot_comparison(all_metrics, path):
    """Loss and accuracy per epoch of every variant, in one figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    eval_split = all_metrics[0]["eval_split"]
    for m in all_metrics:
        epochs = range(1, len(m["test_loss"]) + 1)
        name = m["norm"].upper()
        line, = axes[0].plot(epochs, m["test_loss"], label=f"{name} {eval_split}")
        axes[0].plot(epochs, m["train_loss"], ls="--", color=line.get_color(), label=f"{name} train")
        axes[1].plot(epochs, [100 * a for a in m["train_acc"]], label=name)
        axes[2].plot(epochs, [100 * a for a in m["test_acc"]], label=name)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss (train: with label smoothing)")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="train accuracy (augmented)")
    axes[2].set(xlabel="epoch", ylabel="accuracy (%)", title=f"{eval_split} accuracy")
    _style(*axes)
    save_figure(fig, path)


def plot_misclassified(images, labels, predictions, path, title, count=10):
    """A 5x2 grid of misclassified test images, titled with true and predicted class.

    One image per true class where possible (the first of each), so the grid
    shows the range of mistakes. images are the uint8 originals: exactly what
    the network saw, before normalization.
    """
    plt = _pyplot()
    wrong = (predictions != labels).nonzero().flatten().tolist()
    first_per_class = list({labels[i].item(): i for i in reversed(wrong)}.values())[::-1]
    chosen = sorted(first_per_class, key=lambda i: labels[i].item())
    chosen += [i for i in wrong if i not in chosen]
    fig, axes = plt.subplots(2, 5, figsize=(10, 5), layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen[:count]):
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[predictions[i]]}", fontsize=10)
    fig.suptitle(title)
    save_figure(fig, path)


def results_table(all_metrics):
    """A markdown table: params, final train and test accuracy per variant.

    Train accuracy twice: averaged over the last epoch's augmented batches,
    and of the final weights on the un-augmented training images.
    """
    split = all_metrics[0]["eval_split"]
    lines = [f"| model | params | train acc (last epoch, augmented) | train acc (final weights) "
             f"| {split} acc | s/epoch |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in all_metrics:
        seconds = sum(m["epoch_seconds"]) / len(m["epoch_seconds"])
        lines.append(f"| {m['norm'].upper()} | {m['params']:,} | {100 * m['train_acc'][-1]:.2f}% "
                     f"| {100 * m['train_eval_acc']:.2f}% | {100 * m['test_acc'][-1]:.2f}% "
                     f"| {seconds:.1f} |")
    return "\n".join(lines) + "\n"
