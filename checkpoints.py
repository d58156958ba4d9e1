"""Checkpoints, and the random states a checkpoint carries so that a resumed run
goes on as if it had never stopped."""
import fcntl
import pickle
import random
from pathlib import Path

import numpy as np
import torch

import utils
from utils import UserError


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states(generator):
    """Every random state a run draws from, to store in a checkpoint: tensors, numbers
    and tuples only, which torch.load(weights_only=True) reads without running code."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "gauss": gauss},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "augment": generator.get_state()}


def set_rng_states(states, generator):
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    generator.set_state(states["augment"])


def save_checkpoint(checkpoint, path):
    """Write the checkpoint atomically, behind a digest of its bytes."""
    utils.save_verified(checkpoint, path)


def load_checkpoint(path):
    """The checkpoint at `path`, or UserError if it is missing, unreadable, corrupt, or
    not of the shape train.py writes. It is read with weights_only=True: a pickle that
    would run code (a crafted file, whatever its digest) is refused, never run."""
    try:
        checkpoint = utils.load_verified(path)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} to resume from") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors, numbers and text (written "
                        "by a train.py before 2026-12-06, or crafted), so it is not loaded; "
                        "pass --overwrite to start the run afresh") from None
    except Exception as error:
        reason = str(error) if isinstance(error, ValueError) else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason}); pass --overwrite "
                        "to start the run afresh") from None
    if (problem := malformed(checkpoint)) is not None:
        raise UserError(f"{path} is not a checkpoint of train.py ({problem}); pass "
                        "--overwrite to start the run afresh")
    return checkpoint


def malformed(checkpoint):
    """What is wrong with the shape of a loaded checkpoint, or None: the one check of a
    checkpoint's structure before any part of it is used."""
    def is_dict(value, *keys, of=None):
        return isinstance(value, dict) and set(keys) <= value.keys() and (
            of is None or all(isinstance(v, of) for v in value.values()))

    if not is_dict(checkpoint, "run", "model", "optimizer", "scheduler", "rng", "metrics"):
        return "it lacks the parts of a checkpoint"
    if not is_dict(checkpoint["run"]):
        return "its options are not a mapping"
    if not is_dict({k: v for k, v in checkpoint["model"].items() if k != "_extra_state"}
                   if isinstance(checkpoint["model"], dict) else None, of=torch.Tensor):
        return "its weights are not all tensors"
    optimizer = checkpoint["optimizer"]
    if not (is_dict(optimizer, "state", "param_groups") and isinstance(optimizer["state"], dict)
            and isinstance(optimizer["param_groups"], list)
            and all(isinstance(group, dict) for group in optimizer["param_groups"])):
        return "its optimizer state is malformed"
    scheduler = checkpoint["scheduler"]
    if not (is_dict(scheduler, "last_epoch", "_step_count", "base_lrs")
            and all(isinstance(scheduler[k], int) for k in ("last_epoch", "_step_count"))
            and isinstance(scheduler["base_lrs"], list)):
        return "its schedule is malformed"
    rng = checkpoint["rng"]
    if not (is_dict(rng, "python", "numpy", "torch", "cuda", "augment")
            and is_dict(rng["numpy"], "keys", "position", "has_gauss", "gauss")
            and isinstance(rng["python"], tuple) and isinstance(rng["cuda"], list)
            and all(isinstance(rng[k], torch.Tensor) for k in ("torch", "augment"))
            and isinstance(rng["numpy"]["keys"], torch.Tensor)):
        return "its random states are malformed"
    metrics = checkpoint["metrics"]
    lists = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")
    if not (is_dict(metrics, *lists) and all(isinstance(metrics[k], list) for k in lists)
            and len({len(metrics[k]) for k in lists}) == 1):
        return "its metrics are malformed"
    return None


class FolderLock:
    """Holds an output folder (OUT_DIR, IMAGES_DIR) for one run: a second run into it is
    refused at once. The lock is the operating system's (flock) on FOLDER/.lock, so a
    run that crashed or was killed holds nothing. option: the option that chose the
    folder, for the message."""

    def __init__(self, folder, option="--out-dir"):
        self.path = Path(folder) / ".lock"
        self.option = option
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"another run is writing to {self.path.parent}; wait for it "
                            f"to end, or choose another {self.option}") from None
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
