"""Tiny synthetic CIFAR-10 look-alikes, written to tmp_path, so no test needs the network."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import CLASSES  # noqa: E402


def class_image(label, rng):
    """A 32x32 RGB image whose colour tells its class, plus a little noise."""
    base = np.array([25 * label, 255 - 25 * label, (80 * label) % 256], dtype=np.int16)
    noise = rng.integers(-10, 11, size=(32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image_folder(root, train_per_class=8, test_per_class=2, seed=0):
    """root/{train,test}/<class>/NNNN.png (PNG: lossless, so pixels can be compared)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(class_image(label, rng)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def torch_threads():
    """train.py's --threads sets torch's thread count for the whole process: put it back."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def signal_handlers():
    """An interrupted train.main keeps ignoring stop signals until its process ends: put
    the handlers back."""
    import signal
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def run_args(image_folder, tmp_path):
    """train.py options for a quick run on the synthetic folder (100 images)."""
    def make(*extra, out="out"):
        return ["--data-dir", str(image_folder), "--cache-dir", str(tmp_path / "cache"),
                "--out-dir", str(tmp_path / out), "--epochs", "2", "--batch-size", "32",
                "--device", "cpu", *extra]
    return make


# Ways to break an image folder, each with the error it must give.
BROKEN_FOLDERS = {
    "extra class": (lambda root: (root / "train" / "kitten").mkdir(), "unexpected folder.*kitten"),
    "missing class": (lambda root: shutil.rmtree(root / "test" / "ship"), "no folder for class.*ship"),
    "empty class": (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()],
                    "dog has no images"),
    "only unreadable files": (lambda root: [p.write_text("?") for p in (root / "test").glob("*/*")],
                              "test has no readable images"),
    "too large": (lambda root: Image.new("RGB", (64, 64)).save(root / "train" / "cat" / "big.png"),
                  "big.png is a 64x64 RGB image"),
    "grayscale": (lambda root: Image.new("L", (32, 32)).save(root / "test" / "cat" / "gray.png"),
                  "gray.png is a 32x32 L image"),
    "no test split": (lambda root: shutil.rmtree(root / "test"), "test is missing"),
}
