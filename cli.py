"""What the commands (train.py, evaluate.py, bench.py) share on the command line: the
parser that ends bad input in one line, the option types, and the options themselves,
so that each is defined, checked and documented once."""
import argparse
import contextlib
import ctypes
import math
import os
import signal
import sys
from pathlib import Path

import torch

import devices
import models
import recipe
import utils
from models import ACTIVATION, ACTIVATIONS, BLOCKS, BLOCKS_DEFAULT, GN_GROUPS, PER_CHANNEL
from optimizers import OPTIMIZERS


class Parser(argparse.ArgumentParser):
    """Bad options end in one line on stderr and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(error, code=2):
    """A problem the user can fix, as one line on stderr, and the exit code."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def number_in(kind, low=None, high=None, high_open=False):
    """An argparse type: a `kind` (int or float) from `low` to `high`, finite;
    `high_open`: below `high`, not up to it."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and (
                value > high or (high_open and value == high))):
            upper = "" if high is None else f" and {'below' if high_open else 'at most'} {high}"
            raise argparse.ArgumentTypeError(f"must be at least {low}{upper}, got {text}")
        return value
    return parse


positive_int, non_negative_int = number_in(int, 1), number_in(int, 0)
non_negative_float = number_in(float, 0.0)
fraction = number_in(float, 0.0, 1.0, high_open=True)  # momentum, label smoothing
seed_int = number_in(int, 0, 2**32 - 1)  # numpy's seeds stop there


def positive_float(text):
    value = number_in(float)(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def gn_groups(text):
    """--gn-groups: a whole number, or 'channel' (one group per channel)."""
    return text if text == PER_CHANNEL else positive_int(text)


def per_norm(defaults):
    """'bn 0.9, ln 0.95, gn 0.95', for the help of an option whose default is per norm."""
    return ", ".join(f"{norm} {value}" for norm, value in defaults.items())


def add_recipe_options(parser):
    """The options of the training recipe, with recipe.py's defaults."""
    parser.add_argument("--blocks", choices=BLOCKS, default=BLOCKS_DEFAULT,
                        help="full 3x3 convs in C3-C9, or depthwise-separable ones (2.5x the "
                             "width for the same parameters; default: %(default)s)")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help=f"after every norm (default: per norm, {per_norm(ACTIVATION)})")
    parser.add_argument("--epochs", type=positive_int, default=recipe.EPOCHS,
                        help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=recipe.BATCH_SIZE,
                        help="default: %(default)s")
    parser.add_argument("--lr", type=positive_float, default=recipe.LR,
                        help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    parser.add_argument("--momentum", type=fraction,
                        help="Nesterov momentum, of SGD and Muon, from 0 to below 1 "
                             f"(default: per norm, {per_norm(recipe.MOMENTUM)})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=recipe.OPTIMIZER,
                        help="muon: Muon for the convs that a norm follows, SGD for the rest; "
                             "sgd: SGD for all (default: %(default)s)")
    parser.add_argument("--muon-lr", type=positive_float,
                        help="peak learning rate of the Muon weights "
                             f"(default: per norm, {per_norm(recipe.MUON_LR)})")
    parser.add_argument("--weight-decay", type=non_negative_float, default=recipe.WEIGHT_DECAY,
                        help="default: %(default)s")
    parser.add_argument("--label-smoothing", type=fraction, default=recipe.LABEL_SMOOTHING,
                        help="from 0 to below 1 (default: %(default)s)")
    parser.add_argument("--bn-batch", type=positive_int, metavar="B",
                        help="BN only: each BN layer takes its training statistics over groups "
                             "of B images of every batch (ghost batches), the optimizer still "
                             "steps on the whole batch; B must divide --batch-size (default: "
                             "the whole batch)")
    parser.add_argument("--gn-groups", type=gn_groups, metavar="G",
                        help=f"GN only: GroupNorm's group count, dividing every width, or "
                             f"'{PER_CHANNEL}' for one group per channel (InstanceNorm with a "
                             f"per-channel affine) (default: {GN_GROUPS})")
    parser.add_argument("--translate", type=int, choices=range(0, 9), default=recipe.TRANSLATE,
                        metavar="0..8", help="random shift in pixels, each way (default: %(default)s)")
    parser.add_argument("--cutout", type=int, choices=range(0, 33), default=recipe.CUTOUT,
                        metavar="0..32",
                        help="side of the random cutout square, 0 for none (default: %(default)s)")


def add_data_options(parser):
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="CIFAR-10 as an image folder (train/<class>/*, test/<class>/*) or "
                             "torchvision's files, downloaded there if absent (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=utils.default_cache_dir(),
                        help="where the decoded data set is cached (default: %(default)s)")


def add_device_options(parser, training=True):
    """--device, and for training --compile, --cuda-graph and --amp (evaluate.py has
    its own --amp: a trained model is evaluated in its run's precision)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    if training:
        parser.add_argument("--threads", type=positive_int,
                            help="CPU threads of torch (default: torch's, one per core)")
        parser.add_argument("--compile", action="store_true", help="torch.compile the model")
        parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                            help="on CUDA, capture each training step as a CUDA graph and replay "
                                 "it: one launch per step instead of hundreds (default: on with "
                                 "CUDA, unless --compile)")
        parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                            help="bfloat16 mixed precision (default: on for CPUs with AVX-512 "
                                 "bfloat16 instructions, where it is faster; off elsewhere, e.g. "
                                 "on GPUs, where it is not)")


def check_norm_options(parser, args, norms):
    """--bn-batch and --gn-groups: each of its own norm only, and valid for the network;
    else parser.error. norms: the norms the command trains."""
    for option, norm in recipe.NORM_OPTIONS.items():
        if getattr(args, option) is not None and norm not in norms:
            parser.error(f"--{option.replace('_', '-')} is {norm.upper()}'s option, and "
                         f"{', '.join(n.upper() for n in norms)} has none")
    if args.bn_batch is not None:
        check_bn_batches(parser, "--bn-batch", [args.bn_batch], args.batch_size)
    if args.gn_groups is not None:
        try:
            models.check_gn_groups(args.gn_groups, args.blocks)
        except ValueError as error:
            parser.error(f"--gn-groups: {error}")


def check_bn_batches(parser, option, bn_batches, batch_size, advice=""):
    """parser.error, naming `option` and followed by `advice`, unless every statistics
    batch in bn_batches divides batch_size (train.py's, bench.py's and study.py's check)."""
    if bad := [b for b in bn_batches if batch_size % b]:
        parser.error(f"{option} {', '.join(map(str, bad))} does not divide --batch-size "
                     f"{batch_size}{advice}")


def resolve_device(parser, args):
    """args.device (text) -> torch.device, and args.cuda_graph's default resolved, where
    the parser has those options; a device this machine lacks, or options it cannot
    honour, end in parser.error."""
    compiled, cuda_graph = getattr(args, "compile", False), getattr(args, "cuda_graph", False)
    if cuda_graph and compiled:
        parser.error("--cuda-graph and --compile cannot be combined; pick one")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine; use --device cpu")
    if cuda_graph and args.device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device (--device cuda)")
    if hasattr(args, "cuda_graph"):
        args.cuda_graph = devices.use_cuda_graph(cuda_graph, args.device, compiled)


def check_writable(folder, option):
    """Make `folder` if need be and make sure a file can be written there, before any
    work is done; else UserError naming `option`, the option that chose it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise utils.UserError(f"cannot write to {folder} ({error.strerror}); "
                              f"choose another {option}") from None


# ----------------------------------------------------------------------------
# Stopping: Ctrl-C, SIGTERM, a parent's death
# ----------------------------------------------------------------------------

def stop(signum, frame):
    """The first Ctrl-C or SIGTERM stops the run; later ones are ignored, so that the
    stop itself (its message, the lock's release) is not cut short."""
    signal.signal(signal.SIGINT, ignore)
    signal.signal(signal.SIGTERM, ignore)
    raise KeyboardInterrupt


def ignore(signum, frame):
    """A stop signal after the first. A handler that does nothing, not SIG_IGN: Python
    raises "Signal ignored due to race condition" for a signal that came in while its
    handler was still `stop`, if it finds SIG_IGN when it gets to it."""


def stop_with_parent(parent=None):
    """Have Linux send this process SIGTERM (which stops a run) when its parent dies;
    raise KeyboardInterrupt if the parent (pid `parent`, where given) is gone already."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to ask
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # linux/prctl.h
