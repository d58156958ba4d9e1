"""Checkpoints, and the random states a checkpoint carries so that a resumed run
goes on as if it had never stopped."""
import random

import numpy as np
import torch

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


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path} to resume from") from None
    except Exception as error:
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}); "
                        "delete it and start the run again without --resume") from None
