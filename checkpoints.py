"""Checkpoints, and the random states a checkpoint carries so that a resumed run
goes on as if it had never stopped."""
import fcntl
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


def save_checkpoint(checkpoint, path):
    """Write the checkpoint atomically, behind a digest of its bytes."""
    utils.save_verified(checkpoint, path)


def load_checkpoint(path):
    """The checkpoint at `path`, or UserError if it is missing, unreadable or corrupt."""
    try:
        return utils.load_verified(path, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} to resume from") from None
    except Exception as error:
        reason = str(error) if isinstance(error, ValueError) else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason}); pass --overwrite "
                        "to start the run afresh") from None


class FolderLock:
    """Holds OUT_DIR for one run: a second run into it is refused at once. The lock is
    the operating system's (flock) on OUT_DIR/.lock, so a run that crashed or was
    killed holds nothing."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"another run is writing to {self.path.parent}; wait for it "
                            "to end, or choose another --out-dir") from None
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
