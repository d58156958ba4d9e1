"""Data loading, batched augmentation, the train/test loops and plots.

Nothing here knows about the command line: every function takes what it
needs as arguments. train.py and evaluate.py are the front ends.
"""
import collections
import contextlib
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from devices import autocast, eval_batch_size, memory_format

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
    """Both splits as {"train": (images, labels), "test": (...), "source": ...,
    "digest": ..., "eval_split": "test"}.

    images: uint8 (N, 3, 32, 32), labels: int64 (N,), CIFAR-10's class order.
    `data_dir` holds either an image folder (train/<class>/*, test/<class>/*)
    or torchvision's CIFAR10 files (downloaded there when absent). digest: a sha256
    of the decoded images and labels of both splits, what identifies the data
    wherever it lies (a resumed run checks it).
    """
    data_dir = Path(data_dir)
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"the cache folder {cache_dir} is a file; move it away, or choose "
                        "another cache folder")
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        data = {split: _cached(data_dir / split, cache_dir, partial(_read_image_folder, data_dir / split))
                for split in ("train", "test")}
        source = f"image folder {data_dir}"
    else:
        _ensure_torchvision_files(data_dir, download)
        data = {split: _cached(data_dir / "cifar-10-batches-py", cache_dir,
                               partial(_read_torchvision, data_dir, split == "train"), split)
                for split in ("train", "test")}
        source = f"torchvision CIFAR10 {data_dir}"
    digest = hashlib.sha256("".join(data[split][2] for split in ("train", "test")).encode())
    return {split: data[split][:2] for split in ("train", "test")} | {
        "source": source, "digest": digest.hexdigest(), "eval_split": "test"}


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
            "digest": data["digest"],  # with val_split, which the run records
            "eval_split": "validation"}


def _signature(folder):
    """A digest of the name, size and modification time of every file below `folder`:
    adding, removing, renaming or replacing a file changes it."""
    entries = sorted((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns)
                     for path, stat in ((p, p.stat()) for p in folder.rglob("*")))
    return hashlib.sha256(repr(entries).encode()).hexdigest()


def content_digest(images, labels):
    """A sha256 of the images' and labels' values: the same data gives the same digest
    wherever it was read from."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(tensor.contiguous().numpy().data)
    return digest.hexdigest()


def _cached(folder, cache_dir, read, name=None):
    """(images, labels, content_digest) of read(), cached in cache_dir until a file in
    `folder` changes (_signature).

    The cache carries a digest of its bytes: a corrupt cache is rebuilt, with a
    warning. A cache that cannot be written is a warning too: the run goes on.
    """
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: an image-folder data set needs both "
                        "train/<class>/ and test/<class>/")
    signature = _signature(folder)
    name = name or folder.name
    digest = hashlib.sha1(f"{folder.resolve()}|{name}".encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"{name}-{digest}.pt"
    if cache_file.exists():
        try:
            cached = load_verified(cache_file)
            if cached["signature"] == signature:  # older caches lack the content digest
                return cached["images"], cached["labels"], cached["content_digest"]
        except KeyError:
            pass  # a cache of an older version: rebuilt below
        except Exception as error:  # an unreadable cache is rebuilt below
            print(f"warning: the data cache {cache_file} is unreadable ({error}); rebuilding it")
    images, labels = read()
    digest = content_digest(images, labels)
    try:
        save_verified({"signature": signature, "images": images, "labels": labels,
                       "content_digest": digest}, cache_file)
    except UserError as error:
        print(f"warning: the data cache was not saved: {error}")
    return images, labels, digest


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

    # PIL imports its format plugins on first use: here, not in a worker, where an
    # import under way when a stop comes can leave the threads waiting on each other.
    from PIL import Image
    Image.init()
    pool = ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1))
    try:
        decoded = list(tqdm(pool.map(_decode_image, files), total=len(files),
                            desc=f"decoding {split_dir}", disable=None, leave=False))
    finally:
        # An interrupt cancels the images not yet decoded here and now: `with pool`
        # would wait for all of them where the interrupt leaves map's iterator open.
        pool.shutdown(wait=False, cancel_futures=True)
    unreadable = [str(f) for f, image in zip(files, decoded) if image is None]
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        print(f"warning: skipped {len(unreadable)} file(s) that are not readable images: {shown}")
    kept = [i for i, image in enumerate(decoded) if image is not None]
    if not kept:
        raise UserError(f"{split_dir} has no readable images")
    if empty := sorted(set(CLASSES) - {CLASSES[labels[i]] for i in kept}):
        raise UserError(f"{split_dir} has no readable images of class(es) {', '.join(empty)}")
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


def augment(images, generator, translate, cutout):
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

class TrainStep:
    """One optimizer step on the training images at the given indices: augment, forward,
    backward, update. Returns (loss, number correct), tensors on the device.

    cuda_graph: capture the step as a CUDA graph, one per batch length, and replay
    it. An eager step of this small net is hundreds of tiny kernels that Python
    launches one at a time, and the GPU waits for them (docs/performance.md); a
    replay launches them all in one call. A replay repeats the captured kernels on
    the same memory, so the batch's indices are copied into the graph's own index
    tensor, and the learning rate lives on the device (see below).

    On CUDA each step runs on a stream of its own, `stream`, so that train() can
    run several TrainSteps' kernels at the same time; on the CPU `stream` is None.
    """
    WARMUP_STEPS = 3  # eager steps per batch length before capturing it

    def __init__(self, model, optimizer, images, labels, generator, *, label_smoothing,
                 translate, cutout, amp, cuda_graph=False):
        self.model, self.optimizer = model, optimizer
        self.images, self.labels, self.generator = images, labels, generator
        self.label_smoothing, self.amp = label_smoothing, amp
        self.augmentation = {"translate": translate, "cutout": cutout}
        self.cuda_graph = cuda_graph
        self.stream = torch.cuda.Stream(images.device) if images.device.type == "cuda" else None
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
        return self.learn(x, self.labels[index])

    def learn(self, x, y):
        """Forward, backward and update on a ready (normalized) batch: the step
        without its data work, which bench.py times as the limit."""
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


def train(steps, schedulers, batch_size, desc="train"):
    """One epoch of each run of `steps` (TrainSteps) and `schedulers` (theirs): every
    run over its training images in its own random order.

    The runs take their batches in turn, each on its own CUDA stream (TrainStep.stream),
    so that a GPU runs their kernels at the same time: one run of this small net leaves
    most of it idle (docs/performance.md). Each run draws from its own generator only,
    so it is the same training as it would be alone (tests/test_train.py checks it).

    Returns, per run, (loss, accuracy) averaged over the epoch's augmented batches, or
    for a run whose loss became NaN or infinite, a NonFiniteLoss naming the first such
    batch: returned, not raised, so that the other runs' epoch stands.
    """
    n = len(steps[0].labels)
    device = steps[0].labels.device
    for step in steps:
        step.model.train()
    orders = [torch.randperm(n, generator=step.generator, device=device) for step in steps]
    loss_sums = [torch.zeros((), device=device) for _ in steps]
    corrects = [torch.zeros((), dtype=torch.long, device=device) for _ in steps]
    finite = [[] for _ in steps]  # per batch, checked after the epoch: a check per batch
    #                               would wait for the GPU
    streams = [step.stream for step in steps if step.stream is not None]
    for stream in streams:  # after the work queued so far: the above, the last evaluation
        stream.wait_stream(torch.cuda.current_stream())
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=None, leave=False):
        for run, (step, scheduler) in enumerate(zip(steps, schedulers)):
            with torch.cuda.stream(step.stream):  # None, on the CPU: no change
                index = orders[run][start:start + batch_size]
                loss, correct = step(index)
                scheduler.step()
                finite[run].append(torch.isfinite(loss))
                loss_sums[run] += loss * len(index)
                corrects[run] += correct
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    results = []
    for loss_sum, correct, run_finite in zip(loss_sums, corrects, finite):
        bad_batches = (~torch.stack(run_finite)).nonzero()
        results.append(NonFiniteLoss(f"batch {bad_batches[0].item() + 1} of {len(run_finite)}")
                       if len(bad_batches) else (loss_sum.item() / n, correct.item() / n))
    return results


@torch.inference_mode()
def logits(model, images, batch_size=None, amp=False):
    """The model's outputs (float32) for uint8 images, no augmentation, in eval mode,
    in batches of `batch_size` (default: eval_batch_size of the images' device)."""
    batch_size = batch_size or eval_batch_size(images.device)
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        with autocast(images.device, amp):
            outputs.append(model(normalize(images[start:start + batch_size])).float())
    return torch.cat(outputs)


def probabilities(model, images, batch_size=None, amp=False, flip_tta=False):
    """The model's softmax outputs for uint8 images (see logits). flip_tta: the mean of
    the softmax of each image and of its horizontal mirror, the standard cheap
    test-time augmentation (training flips images at random, so both views are ones
    the model learned from)."""
    p = logits(model, images, batch_size, amp).softmax(1)
    if flip_tta:
        p = (p + logits(model, images.flip(-1), batch_size, amp).softmax(1)) / 2
    return p


def test(model, images, labels, batch_size=None, amp=False):
    """(loss, accuracy, predictions) of the model on uint8 images (see logits)."""
    output = logits(model, images, batch_size, amp)
    predictions = output.argmax(1)
    accuracy = (predictions == labels).float().mean().item()
    return F.cross_entropy(output, labels).item(), accuracy, predictions


def per_class_accuracy(labels, predictions):
    """Accuracy on each class's images, as a list in CLASSES order."""
    correct = torch.bincount(labels[predictions == labels], minlength=len(CLASSES))
    return (correct / torch.bincount(labels, minlength=len(CLASSES)).clamp(min=1)).tolist()


# ----------------------------------------------------------------------------
# Files replaced atomically
# ----------------------------------------------------------------------------

def _replace_atomically(path, write):
    """write(temporary path), then rename it to `path`: a crash never leaves half a
    file, and two processes never share a temporary file (its name is unique). A
    failed write (a full or read-only disk) removes the temporary file and raises
    UserError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"could not write {path} ({reason}); free some space, or choose "
                        "another folder") from None
    finally:
        with contextlib.suppress(OSError):  # e.g. its folder could not be made
            tmp.unlink(missing_ok=True)


def _serialized(obj):
    """torch.save's bytes of `obj`. Saved to a buffer, not a file: the zip's inner folder
    takes a file's name, and a temporary file's unique name would make two saves of the
    same weights differ in their bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj, path):
    """torch.save `obj` to `path`, atomically; the same `obj` gives the same bytes."""
    data = _serialized(obj)
    _replace_atomically(path, lambda tmp: tmp.write_bytes(data))


DIGEST_HEADER = b"cifar-norms sha256 "


def save_verified(obj, path):
    """torch.save `obj` to `path`, atomically, behind a digest of its bytes that
    load_verified checks: flipped bytes are noticed, not used."""
    data = _serialized(obj)
    header = DIGEST_HEADER + hashlib.sha256(data).hexdigest().encode() + b"\n"
    _replace_atomically(path, lambda tmp: tmp.write_bytes(header + data))


def load_verified(path):
    """What save_verified wrote to `path`, read with weights_only=True: tensors, numbers,
    text and containers of them, never code. Raises FileNotFoundError, ValueError when
    the file is not of save_verified or its bytes differ from their digest, and
    pickle.UnpicklingError for any other object."""
    raw = Path(path).read_bytes()
    header, _, data = raw.partition(b"\n")
    if not header.startswith(DIGEST_HEADER):
        raise ValueError("no digest")
    if hashlib.sha256(data).hexdigest().encode() != header[len(DIGEST_HEADER):]:
        raise ValueError("its content does not match its digest: the file is corrupt")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")  # _replace_atomically's


def remove_stale_temporaries(folder):
    """Remove the temporary files below `folder` whose writer (the process in their
    name) is gone: what a writer killed mid-write leaves. Returns how many."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and not _process_exists(int(match[1])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def atomic_write_text(text, path):
    """Write `text` to `path`, atomically: metrics.json marks a finished run."""
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


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
    _style(ax_loss, ax_acc, epochs=len(metrics["train_loss"]))
    fig.suptitle(f"{metrics['norm'].upper()}: {metrics['params']:,} parameters")
    save_figure(fig, path)


def _style(*axes, epochs=None):
    """Grid and legend; with `epochs`, every epoch ticked on the x axis."""
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        if epochs:
            ax.set_xticks(range(1, epochs + 1))
            ax.tick_params(axis="x", labelsize=8)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()


def plot_comparison(runs, path, title):
    """Loss and accuracy per epoch of every variant: train and evaluation split in
    panels of their own, one line per variant in each. runs: {variant name: [metrics
    of each seed]}; over several seeds the line is their mean and the band their range."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
    eval_split = next(iter(runs.values()))[0]["eval_split"]
    panels = {("train", "loss"): "train loss (augmented, with label smoothing)",
              ("test", "loss"): f"{eval_split} loss",
              ("train", "acc"): "train accuracy (augmented)",
              ("test", "acc"): f"{eval_split} accuracy"}
    for ax, ((split, kind), panel_title) in zip(axes.T.flat, panels.items()):
        for name, seeds in runs.items():
            values = torch.tensor([m[f"{split}_{kind}"] for m in seeds]) * (100 if kind == "acc" else 1)
            epochs = range(1, values.shape[1] + 1)
            line, = ax.plot(epochs, values.mean(0), marker=".", label=name)
            if len(seeds) > 1:
                ax.fill_between(epochs, values.min(0).values, values.max(0).values,
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel="accuracy (%)" if kind == "acc" else "loss", title=panel_title)
    _style(*axes.flat, epochs=max(len(m["test_acc"]) for seeds in runs.values() for m in seeds))
    fig.suptitle(title)
    save_figure(fig, path)


def _spread_over_classes(indices, labels):
    """`indices`, reordered: the first of each true class first (in class order),
    then the rest in their order, so that a grid of the first few shows many classes."""
    first_per_class = {}
    for i in indices:
        first_per_class.setdefault(labels[i].item(), i)
    firsts = [first_per_class[label] for label in sorted(first_per_class)]
    return firsts + [i for i in indices if i not in set(firsts)]


def _image_grid(title, height=5.5):
    """A 2x5 grid of empty panels for 10 images."""
    fig, axes = _pyplot().subplots(2, 5, figsize=(10, height), layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title)
    return fig, axes.flat


def _show(ax, image):
    """A uint8 (3, H, W) image, pixels as they are: exactly what the network saw."""
    ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")


def misclassified_indices(labels, predictions, count=10):
    """`count` misclassified images, one per true class where possible: those of the
    misclassified grid and of the Grad-CAM grid."""
    wrong = (predictions != labels).nonzero().flatten().tolist()
    return _spread_over_classes(wrong, labels)[:count]


def disagreement_indices(labels, probabilities, count=10):
    """`count` images that some model gets wrong and another right, one per true class
    where possible, then ones all get wrong: where the models differ.
    probabilities: {model name: (N, 10) softmax outputs}."""
    right = torch.stack([p.argmax(1) == labels for p in probabilities.values()])
    split = (right.any(0) & ~right.all(0)).nonzero().flatten().tolist()
    all_wrong = (~right.any(0)).nonzero().flatten().tolist()
    return (_spread_over_classes(split, labels) + all_wrong)[:count]


def plot_misclassified(images, labels, predictions, path, title, count=10):
    """A 5x2 grid of misclassified test images, titled with true and predicted class,
    one image per true class where possible."""
    fig, axes = _image_grid(title)
    for ax, i in zip(axes, misclassified_indices(labels, predictions, count)):
        _show(ax, images[i])
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[predictions[i]]}", fontsize=10)
    save_figure(fig, path)


def plot_misclassified_compared(images, labels, probabilities, path, title, count=10):
    """The same test images under every model (disagreement_indices): each with its
    true class and every model's prediction and confidence, marked right or wrong.

    probabilities: {model name: (N, 10) softmax outputs}.
    """
    predictions = {name: p.argmax(1) for name, p in probabilities.items()}
    fig, axes = _image_grid(title, height=4 + 0.5 * len(probabilities))
    for ax, i in zip(axes, disagreement_indices(labels, probabilities, count)):
        _show(ax, images[i])
        lines = [f"true: {CLASSES[labels[i]]}"]
        for name, p in probabilities.items():
            guess = predictions[name][i].item()
            mark = "\u2713" if guess == labels[i] else "\u2717"  # check mark, ballot x
            lines.append(f"{mark} {name}: {CLASSES[guess]} {100 * p[i, guess]:.0f}%")
        ax.set_title("\n".join(lines), fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------
# Grad-CAM: where a model looks
# ----------------------------------------------------------------------------

def grad_cam(model, images, targets):
    """Grad-CAM maps (N, H, W) of the model for the uint8 images and target classes, at
    the images' size, each scaled to [0, 1] by its peak (all 0 where nothing speaks
    for the class).

    captum's LayerGradCam at the input of `model.gap`, the global average pool: the
    last feature maps (C9's output plus its skip, 8x8 here), weighted by the class
    score's gradient and summed over the channels, negative parts cut; captum's
    interpolation brings them to the image's size. In float32, whatever the run's
    precision: gradients of bfloat16 maps would be coarse.
    """
    from captum.attr import LayerAttribution, LayerGradCam  # here only: training never pays its import
    if not len(images):  # e.g. a model that got every image right
        return torch.zeros(0, *images.shape[-2:], device=images.device)
    model = model.float().eval()
    x = normalize(images).float()
    maps = LayerGradCam(model, model.gap).attribute(
        x, target=torch.as_tensor(targets, device=images.device), attribute_to_layer_input=True,
        relu_attributions=True)
    maps = LayerAttribution.interpolate(maps, tuple(images.shape[-2:]), "bilinear")[:, 0].detach()
    peaks = maps.flatten(1).amax(1).clamp(min=torch.finfo(maps.dtype).tiny)
    return (maps / peaks[:, None, None]).clamp(0, 1)


def _overlay(ax, image, heat):
    """The image, with a Grad-CAM map over it; returns the map's artist for a colour bar."""
    _show(ax, image)
    return ax.imshow(heat.cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1,
                     interpolation="bilinear")


def _colour_bar(fig, artist, axes):
    fig.colorbar(artist, ax=axes, shrink=0.6, label="Grad-CAM, scaled to its peak")


def plot_gradcam(model, images, labels, probabilities, path, title, count=10):
    """The model's misclassified images (those of plot_misclassified) as a 5x2 grid,
    each twice: with the Grad-CAM map of its predicted class and of its true class,
    titled with the class and the model's confidence in it."""
    chosen = misclassified_indices(labels, probabilities.argmax(1), count)
    predicted = probabilities[chosen].argmax(1)
    maps = {"pred": grad_cam(model, images[chosen], predicted),
            "true": grad_cam(model, images[chosen], labels[chosen])}
    fig, axes = _pyplot().subplots(4, 5, figsize=(10, 9.5), layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(chosen):
        for row, (kind, target) in enumerate((("pred", predicted[k]), ("true", labels[i]))):
            ax = axes[2 * (k // 5) + row, k % 5]
            artist = _overlay(ax, images[i], maps[kind][k])
            ax.set_title(f"{kind}: {CLASSES[target]} {100 * probabilities[i, target]:.0f}%",
                         fontsize=9)
    if chosen:
        _colour_bar(fig, artist, axes)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_gradcam_compared(models, images, labels, probabilities, path, title, count=10):
    """The images of plot_misclassified_compared, one row each: the image with its true
    class, then each model's Grad-CAM map for its own prediction, titled with the
    prediction and the confidence. models, probabilities: {model name: ...}."""
    chosen = disagreement_indices(labels, probabilities, count)
    maps = {name: grad_cam(model, images[chosen], probabilities[name][chosen].argmax(1))
            for name, model in models.items()}
    columns = 1 + len(models)
    fig, axes = _pyplot().subplots(max(len(chosen), 1), columns, figsize=(1.9 * columns + 1.2,
                                   1.9 * max(len(chosen), 1) + 0.8), layout="constrained",
                                   squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, i in enumerate(chosen):
        _show(axes[row, 0], images[i])
        axes[row, 0].set_title(f"true: {CLASSES[labels[i]]}", fontsize=9)
        for column, name in enumerate(models, 1):
            guess = probabilities[name][i].argmax().item()
            mark = "\u2713" if guess == labels[i] else "\u2717"
            artist = _overlay(axes[row, column], images[i], maps[name][row])
            axes[row, column].set_title(f"{mark} {name}: {CLASSES[guess]} "
                                        f"{100 * probabilities[name][i, guess]:.0f}%", fontsize=9)
    if chosen:
        _colour_bar(fig, artist, axes)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(labels, predictions, path, title):
    """The confusion matrix: how many of each true class went to each predicted class."""
    plt = _pyplot()
    counts = torch.bincount(labels * len(CLASSES) + predictions, minlength=len(CLASSES) ** 2)
    counts = counts.view(len(CLASSES), len(CLASSES)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    image = ax.imshow(counts, cmap="Blues")
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, value, ha="center", va="center", fontsize=8,
                color="white" if value > counts.max() / 2 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    save_figure(fig, path)


def plot_per_class(accuracies, path, title):
    """Accuracy per class, a bar per model side by side. accuracies: {model name:
    list in CLASSES order}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.5), layout="constrained")
    width = 0.8 / len(accuracies)
    for k, (name, values) in enumerate(accuracies.items()):
        ax.bar(np.arange(len(CLASSES)) + (k - (len(accuracies) - 1) / 2) * width,
               [100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    low = min(min(values) for values in accuracies.values())
    ax.set(ylabel="accuracy (%)", ylim=(max(0, 100 * low - 10), 100), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(accuracies))
    save_figure(fig, path)


def mean_min_max(accuracies):
    """The mean, min and max of accuracies (fractions), in percent."""
    values = [100 * a for a in accuracies]
    return sum(values) / len(values), min(values), max(values)


def plot_study(runs, references, study, path, test_time=None):
    """A study's figure (study.py): test accuracy against the setting, the mean over the
    seeds with their range as error bars. runs: {setting: [metrics of each seed]};
    references: {norm name: [metrics of each seed]}, other norms' default runs, drawn
    as flat bands (bn-batch: they do not depend on B) or, for LN in gn-groups, as a
    point beside G = 1 (LN is GN with one group, in its own recipe). test_time:
    {setting: [accuracy of each seed]}, a second curve (bn-batch: the default runs
    evaluated with the statistics of B test images)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    split = next(iter(runs.values()))[0]["eval_split"]

    def accuracies(seeds):
        return mean_min_max([m["test_acc"][-1] for m in seeds])

    def draw(xs, stats, **style):
        mean, low, high = zip(*stats)
        ax.errorbar(xs, mean, yerr=[[m - lo for m, lo in zip(mean, low)],
                                    [hi - m for m, hi in zip(mean, high)]], capsize=4, **style)

    settings = list(runs)
    # bn-batch: B on a log-2 axis; gn-groups: the group counts in order, "channel" last.
    xs = settings if study == "bn-batch" else list(range(len(settings)))
    norm = next(iter(runs.values()))[0]["norm"].upper()
    draw(xs, [accuracies(runs[s]) for s in settings], marker="o",
         label=f"{norm} trained with statistics of B images" if study == "bn-batch"
         else f"{norm} with G groups")
    if test_time:
        draw(list(test_time), [mean_min_max(v) for v in test_time.values()], marker="v",
             color="C3", linestyle=":",
             label=f"{norm} of the default runs, tested with statistics of B test images")
    for k, (name, seeds) in enumerate(references.items()):
        color = f"C{k + 1}"
        if study == "gn-groups" and name == "LN":
            draw([-0.15], [accuracies(seeds)], marker="s", color=color,
                 linestyle="none", label="LN, its own recipe (GN with 1 group)")
            continue
        ref_mean, ref_low, ref_high = accuracies(seeds)
        ax.axhspan(ref_low, ref_high, color=color, alpha=0.15, linewidth=0)
        ax.axhline(ref_mean, color=color, linestyle="--",
                   label=f"{name} (default, independent of {'B' if study == 'bn-batch' else 'G'})")
    if study == "bn-batch":
        ax.set_xscale("log", base=2)
        ax.set_xticks(settings, [str(s) for s in settings])
        ax.set(xlabel="B: images per BN statistics group (the optimizer's batch stays "
                      f"{runs[settings[0]][0]['batch_size']})")
    else:
        ax.set_xticks(xs, ["per\nchannel" if s == "channel" else str(s) for s in settings])
        ax.set(xlabel="G: GroupNorm's group count")
    counts = sorted({len(seeds) for seeds in runs.values()})
    ax.set(ylabel=f"{split} accuracy (%)",
           title=f"{split} accuracy of the final weights: mean and range over "
                 f"{'-'.join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))} "
                 "seeds a point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    save_figure(fig, path)
