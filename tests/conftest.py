"""Tiny synthetic CIFAR-10 look-alikes, written to tmp_path, so no test needs the network;
and the checks that several test files share."""
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
import utils  # noqa: E402
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
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def signal_handlers():
    """An interrupted train.main keeps ignoring stop signals until its process ends: put
    the handlers back."""
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


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def read_metrics(path):
    metrics = json.loads(path.read_text())
    metrics.pop("epoch_seconds")  # wall-clock time is the one thing allowed to differ,
    metrics.pop("runs_at_once")  # with how many runs shared the machine meanwhile
    metrics.pop("resumed", None)  # where a resumed run went on
    return metrics


def assert_same_run(run_a, run_b):
    """Two run folders of one variant hold identical metrics and bit-identical weights."""
    assert read_metrics(run_a / "metrics.json") == read_metrics(run_b / "metrics.json")
    a, b = torch.load(run_a / "model.pt"), torch.load(run_b / "model.pt")
    assert a.pop("_extra_state") == b.pop("_extra_state")  # the network's config
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(capsys, argv, main=train.main):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def stop_after_the_first_epoch(argv, monkeypatch):
    """train.main(argv), interrupted as a Ctrl-C would after its first epoch."""
    real_train, calls = utils.train, []

    def interrupted_in_the_second(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_train(*args, **kwargs)
    monkeypatch.setattr(utils, "train", interrupted_in_the_second)
    with pytest.raises(SystemExit):
        train.main(argv)
    monkeypatch.undo()
