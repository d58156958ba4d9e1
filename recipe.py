"""The training recipe, defined once: train.py's defaults, the step bench.py times, and
how the options of older runs that did not record them are read (summarize.py).

The network itself (blocks, activation per norm) is models.Net's default. Why each
value: docs/ablation.md and docs/optimizer.md.
"""
import devices
import optimizers
import reports
import utils
from models import ACTIVATION, GN_GROUPS, Net

EPOCHS = 20
BATCH_SIZE = 128
LR = 0.1                # peak of the one-cycle schedule
WARMUP_FRACTION = 0.25  # of the steps, rising to the peak; then down to 0
MOMENTUM = {"bn": 0.9, "ln": 0.95, "gn": 0.95}  # Nesterov, of SGD and Muon
WEIGHT_DECAY = 5e-4     # SGD's; the Muon weights have none (optimizers.Muon)
OPTIMIZER = "muon"      # Muon for the convs that a norm follows, SGD for the rest
MUON_LR = {"bn": 0.03, "ln": 0.015, "gn": 0.03}  # peak for the Muon weights
LABEL_SMOOTHING = 0.1
TRANSLATE = 4           # pixels of random shift each way
CUTOUT = 0              # side of the cutout square; 0 = off

# The options a checkpoint must share with the run that resumes it.
RUN_OPTIONS = ("norm", "blocks", "activation", "gn_groups", "bn_batch", "epochs", "batch_size",
               "lr", "momentum", "optimizer", "muon_lr", "weight_decay", "label_smoothing",
               "translate", "cutout", "seed", "val_split", "amp")


def run_options(norm, args):
    """The options of one variant's run, from args (train.py's or bench.py's parsed
    options), the per-norm and per-device defaults resolved."""
    return {key: getattr(args, key) for key in RUN_OPTIONS if hasattr(args, key)} | {
        "norm": norm, "amp": devices.use_amp(args.amp, args.device),
        "momentum": MOMENTUM[norm] if args.momentum is None else args.momentum,
        "muon_lr": ((MUON_LR[norm] if args.muon_lr is None else args.muon_lr)
                    if args.optimizer == "muon" else None),  # no Muon lr where no Muon
        "activation": ACTIVATION[norm] if args.activation is None else args.activation,
        # Each norm's own option (NORM_OPTIONS), None for the others; a statistics batch
        # of the whole batch is plain BN.
        "gn_groups": (args.gn_groups or GN_GROUPS) if norm == "gn" else None,
        "bn_batch": args.bn_batch if norm == "bn" and args.bn_batch != args.batch_size else None}


def make_model(run):
    """The network of `run` (run_options)."""
    return Net(run["norm"], run["blocks"], run["activation"], run["gn_groups"], run["bn_batch"])


def make_optimizer(run, model):
    """The optimizer of `run` (run_options) for `model`'s weights."""
    return optimizers.make_optimizer(model, run["optimizer"], run["lr"], run["momentum"],
                                    run["weight_decay"], run["muon_lr"])


def schedule(optimizer, total_steps):
    """The learning rates' one-cycle schedule over `total_steps` steps of `optimizer`."""
    return optimizers.one_cycle(optimizer, total_steps, WARMUP_FRACTION)


def make_step(run, model, optimizer, images, labels, generator, cuda_graph=False):
    """The training step of `run` for `model` and its `optimizer` on these images:
    its loss, augmentation and precision."""
    return utils.TrainStep(model, optimizer, images, labels, generator,
                           label_smoothing=run["label_smoothing"], translate=run["translate"],
                           cutout=run["cutout"], amp=run["amp"], cuda_graph=cuda_graph)


# What may differ between the runs of one recipe (data_digest: older runs did not
# record it; data_source names their data).
PER_RUN = {"seed", "data_digest", reports.TTA, "train_acc", "train_loss", "test_acc", "test_loss", "train_eval_acc",
           "epoch_seconds", "runs_at_once", "threads", "device", "processor", "torch",
           "cuda_graph", "resumed"}

# Options that older runs did not record, with the value those runs used: --blocks
# (before it, plain blocks), --amp (before it was recorded, float32), --activation
# (ReLU), --optimizer (SGD, hence no Muon learning rate), and the options of the
# experiments that were measured and not kept (docs/ablation.md).
RECORDED_LATER = {"blocks": "plain", "amp": False, "activation": "relu", "ema": 0.0,
                  "wd_all": 1, "gn_groups": GN_GROUPS, "bn_batch": None, "whiten": 0, "warmup": 0.25, "alt_flip": False,
                  "clean_last": 0, "decay": "linear", "init": "default",
                  "optimizer": "sgd", "muon_lr": None}


# Each norm's own option: None for the other norms, where it means nothing.
NORM_OPTIONS = {"gn_groups": "gn", "bn_batch": "bn"}


def of_run(metrics):
    """The recipe a finished run used: its metrics less what differs from run to run,
    with the options it did not record read as the values it used (NORM_OPTIONS None
    where they mean nothing)."""
    run = {**RECORDED_LATER, **{k: v for k, v in metrics.items() if k not in PER_RUN}}
    return run | {key: run[key] if run["norm"] == norm else None
                  for key, norm in NORM_OPTIONS.items()}
