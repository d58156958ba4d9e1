"""Train the CIFAR-10 network with BatchNorm, LayerNorm or GroupNorm and report.

    python train.py --norm bn      # one variant
    python train.py                # all three in turn, then the comparison

Outputs (see README, "Outputs"): <out-dir>/<norm>/{metrics.json, model.pt,
checkpoint.pt}, <images-dir>/<norm>_curves.png, <norm>_misclassified.png,
comparison.png and <out-dir>/results.md.
"""
import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

import summarize
import utils
from models import ACTIVATIONS, BLOCKS, NORMS, Net, count_parameters
from utils import UserError

# ----------------------------------------------------------------------------
# The default recipe
# ----------------------------------------------------------------------------
BLOCKS_DEFAULT = "separable"  # 3x3 blocks of C3-C9, see models.py
# The activation after every norm, per norm: on validation GELU instead of ReLU gained
# more than a point with LN and GN on every seed tried, and lost 0.74 with BN, whose
# epochs it makes slower; see README, "Ablation".
ACTIVATION = {"bn": "relu", "ln": "gelu", "gn": "gelu"}
EPOCHS = 20
BATCH_SIZE = 128
LR = 0.1                # peak of the one-cycle schedule
# Nesterov momentum, per norm: on validation 0.95 gained on every one of 3 seeds with
# LN (+0.49 on the mean) and GN (+0.31), and lost 0.20 with BN; see README, "Ablation".
MOMENTUM = {"bn": 0.9, "ln": 0.95, "gn": 0.95}
WEIGHT_DECAY = 5e-4
# The optimizer: "muon" trains the convs that a norm follows with Muon at MUON_LR
# (utils.Muon), the rest with the SGD above; "sgd" trains everything with SGD. On
# validation Muon gained with every norm and seed tried; see README, "The optimizer".
OPTIMIZER = "muon"
# Peak of the one-cycle schedule for the Muon weights, per norm: on validation 0.015
# instead of 0.03 gained with LN on both seeds tried (+0.34, +1.06); 0.0075 and 0.06
# lost, and so did 0.015 and 0.06 with GN and 0.02 with BN; see README, "Ablation".
MUON_LR = {"bn": 0.03, "ln": 0.015, "gn": 0.03}
LABEL_SMOOTHING = 0.1
TRANSLATE = 4           # pixels of random shift each way
CUTOUT = 0              # side of the cutout square; 0 = off

# The options a checkpoint must share with the run that resumes it.
RUN_OPTIONS = ("norm", "blocks", "activation", "epochs", "batch_size", "lr", "momentum",
               "optimizer", "muon_lr", "weight_decay", "label_smoothing", "translate", "cutout",
               "seed", "val_split", "amp")


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """Bad options end in one line on stderr and exit code 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum):
    """An argparse type: a whole number, `minimum` or more."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text):
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def resolve_device(parser, args):
    """args.device (text) -> torch.device, and args.cuda_graph's default resolved;
    a device this machine lacks, or options it cannot honour, end in parser.error.
    Shared with bench.py, which has the same --device, --compile and --cuda-graph."""
    if args.cuda_graph and args.compile:
        parser.error("--cuda-graph and --compile cannot be combined; pick one")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine; use --device cpu")
    if args.cuda_graph and args.device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device (--device cuda)")
    args.cuda_graph = utils.use_cuda_graph(args.cuda_graph, args.device, args.compile)


def parse_args(argv=None):
    parser = Parser(description="Train the small CIFAR-10 network with BatchNorm (bn), "
                                "LayerNorm (ln) or GroupNorm (gn) and report how it did.")
    parser.add_argument("--norm", choices=[*NORMS, "all"], default="all",
                        help="normalization variant to train (default: all three in turn)")
    parser.add_argument("--blocks", choices=BLOCKS, default=BLOCKS_DEFAULT,
                        help="full 3x3 convs in C3-C9, or depthwise-separable ones (2.5x the "
                             "width for the same parameters; default: %(default)s)")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help="after every norm (default: per norm, "
                             + ", ".join(f"{norm} {a}" for norm, a in ACTIVATION.items()) + ")")
    parser.add_argument("--epochs", type=positive_int, default=EPOCHS, help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="default: %(default)s")
    parser.add_argument("--lr", type=positive_float, default=LR,
                        help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    parser.add_argument("--momentum", type=non_negative_float,
                        help="Nesterov momentum, of SGD and Muon (default: per norm, "
                             + ", ".join(f"{norm} {m}" for norm, m in MOMENTUM.items()) + ")")
    parser.add_argument("--optimizer", choices=utils.OPTIMIZERS, default=OPTIMIZER,
                        help="muon: Muon for the convs that a norm follows, SGD for the rest; "
                             "sgd: SGD for all (default: %(default)s)")
    parser.add_argument("--muon-lr", type=positive_float,
                        help="peak learning rate of the Muon weights (default: per norm, "
                             + ", ".join(f"{norm} {lr}" for norm, lr in MUON_LR.items()) + ")")
    parser.add_argument("--weight-decay", type=non_negative_float, default=WEIGHT_DECAY, help="default: %(default)s")
    parser.add_argument("--label-smoothing", type=non_negative_float, default=LABEL_SMOOTHING,
                        help="default: %(default)s")
    parser.add_argument("--translate", type=int, choices=range(0, 9), default=TRANSLATE, metavar="0..8",
                        help="random shift in pixels, each way (default: %(default)s)")
    parser.add_argument("--cutout", type=int, choices=range(0, 33), default=CUTOUT, metavar="0..32",
                        help="side of the random cutout square, 0 for none (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--val-split", type=non_negative_int, default=0, metavar="N",
                        help="hold out N training images (the same N for every seed) and evaluate "
                             "on them instead of the test set, to choose hyperparameters "
                             "(default: 0, evaluate on the test set)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="CIFAR-10 as an image folder (train/<class>/*, test/<class>/*) or "
                             "torchvision's files, downloaded there if absent (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=utils.default_cache_dir(),
                        help="where the decoded data set is cached (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="metrics, weights and checkpoints go to OUT_DIR/<norm>/ (default: %(default)s)")
    parser.add_argument("--images-dir", type=Path,
                        help="where the figures go (default: OUT_DIR/images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="bfloat16 mixed precision (default: on for CPUs with AVX-512 "
                             "bfloat16 instructions, where it is faster; off elsewhere, e.g. on "
                             "GPUs, where it is not)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                        help="on CUDA, capture each training step as a CUDA graph and replay it: "
                             "one launch per step instead of hundreds (default: on with CUDA, "
                             "unless --compile)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each variant from its checkpoint in OUT_DIR, where there is one")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in OUT_DIR")
    parser.add_argument("--plots-only", action="store_true",
                        help="train nothing: redraw the figures and results table of the runs "
                             "finished in OUT_DIR")
    args = parser.parse_args(argv)
    resolve_device(parser, args)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; pick one")
    args.images_dir = args.images_dir or args.out_dir / "images"
    return args


# ----------------------------------------------------------------------------
# One variant
# ----------------------------------------------------------------------------

def output_files(norm, args):
    run_dir = args.out_dir / norm
    return {"metrics": run_dir / "metrics.json", "model": run_dir / "model.pt",
            "checkpoint": run_dir / "checkpoint.pt",
            "curves": args.images_dir / f"{norm}_curves.png",
            "misclassified": args.images_dir / f"{norm}_misclassified.png"}


def check_not_clobbering(files, args):
    if args.overwrite or (args.resume and files["checkpoint"].exists()):
        return
    existing = [str(path) for path in files.values() if path.exists()]
    if existing:
        hint = "--resume to continue it, " if files["checkpoint"].exists() else ""
        raise UserError(f"an earlier run's outputs are in the way ({', '.join(existing[:2])}"
                        f"{' ...' if len(existing) > 2 else ''}); pass {hint}--overwrite to "
                        "replace them, or choose another --out-dir")


def run_options(norm, args):
    """The options of one variant's run, the per-norm and per-device defaults resolved."""
    return {key: getattr(args, key) for key in RUN_OPTIONS} | {
        "norm": norm, "amp": utils.use_amp(args.amp, args.device),
        "momentum": MOMENTUM[norm] if args.momentum is None else args.momentum,
        "muon_lr": ((MUON_LR[norm] if args.muon_lr is None else args.muon_lr)
                    if args.optimizer == "muon" else None),  # no Muon lr where no Muon
        "activation": ACTIVATION[norm] if args.activation is None else args.activation}


def restore(checkpoint, run, model, optimizer, scheduler, generator, path):
    """Load a checkpoint into the run, or raise UserError before changing anything."""
    expected_keys = {"run", "model", "optimizer", "scheduler", "rng", "metrics"}
    if not isinstance(checkpoint, dict) or not expected_keys <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py; "
                        "pass --overwrite to start afresh")
    saved_run = checkpoint["run"]
    if (different := [key for key in RUN_OPTIONS if saved_run.get(key) != run[key]]):
        raise UserError(f"{path} was made with other options "
                        + ", ".join(f"{key}={saved_run.get(key)!r}" for key in different)
                        + "; resume with the same options, or pass --overwrite to start afresh")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    saved_shapes = {k: v.shape for k, v in checkpoint["model"].items()}
    if shapes != saved_shapes:
        raise UserError(f"{path} holds weights of a different model; pass --overwrite to start afresh")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    utils.set_rng_states(checkpoint["rng"], generator)
    return checkpoint["metrics"]


def machine(device):
    """What a run ran on, for its metrics: timings depend on it."""
    return {"device": str(device), "processor": utils.processor_name(device),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_variant(norm, args, data, device):
    files = output_files(norm, args)
    check_not_clobbering(files, args)
    checkpoint = utils.load_checkpoint(files["checkpoint"]) if (
        args.resume and files["checkpoint"].exists()) else None

    utils.seed_everything(args.seed)
    run = run_options(norm, args)
    model = Net(norm, args.blocks, activation=run["activation"])
    params = count_parameters(model)
    print(f"\n=== {norm.upper()}: {params:,} trainable parameters ===")
    if checkpoint is None:
        from torchsummary import summary
        # On the CPU, before the move: on CUDA torchsummary would put its input on cuda:0
        # whatever the device, and cuDNN would tune its algorithms for a batch of 2.
        summary(model.eval(), (3, 32, 32), device="cpu")
        utils.seed_everything(args.seed)  # the summary's forward pass drew random numbers
    model = model.to(device, memory_format=utils.memory_format(device))

    train_images, train_labels = (t.to(device) for t in data["train"])
    test_images, test_labels = (t.to(device) for t in data["test"])
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    optimizer = utils.make_optimizer(model, run["optimizer"], args.lr, run["momentum"],
                                     args.weight_decay, run["muon_lr"])
    scheduler = utils.one_cycle(optimizer, args.epochs * steps_per_epoch)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)

    metrics = {**run, "params": params, **machine(device), "cuda_graph": args.cuda_graph,
               "data_source": data["source"], "eval_split": data["eval_split"],
               "train_size": len(train_labels),
               "test_size": len(test_labels), "train_loss": [], "train_acc": [],
               "test_loss": [], "test_acc": [], "epoch_seconds": []}
    if checkpoint is not None:
        metrics = restore(checkpoint, run, model, optimizer, scheduler, generator,
                          files["checkpoint"])
        print(f"resuming from epoch {len(metrics['train_loss'])} of {args.epochs}")
        # The run's machine fields say where it started; its epoch_seconds from here
        # on may come from another machine.
        metrics.setdefault("resumed", []).append(
            {"epoch": len(metrics["train_loss"]) + 1, **machine(device)})
    step_model = torch.compile(model) if args.compile else model
    step = utils.TrainStep(step_model, optimizer, train_images, train_labels, generator,
                           label_smoothing=args.label_smoothing, amp=run["amp"],
                           augmentation={"translate": args.translate, "cutout": args.cutout},
                           cuda_graph=args.cuda_graph)

    for epoch in range(len(metrics["train_loss"]) + 1, args.epochs + 1):
        start = time.perf_counter()
        try:
            train_loss, train_acc = utils.train(step, scheduler, args.batch_size,
                                                desc=f"{norm} epoch {epoch}")
        except utils.NonFiniteLoss as error:
            raise utils.NonFiniteLoss(
                f"{norm}: the loss became NaN or infinite in epoch {epoch}, {error}. "
                f"The last good checkpoint ({files['checkpoint']}) is kept; "
                "try a lower --lr") from None
        test_loss, test_acc, _ = utils.test(step_model, test_images, test_labels, amp=run["amp"])
        seconds = time.perf_counter() - start
        for key, value in [("train_loss", train_loss), ("train_acc", train_acc),
                           ("test_loss", test_loss), ("test_acc", test_acc),
                           ("epoch_seconds", seconds)]:
            metrics[key].append(value)
        print(f"{norm} epoch {epoch:2d}/{args.epochs}  train loss {train_loss:.4f} "
              f"acc {100 * train_acc:5.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:5.2f}%  "
              f"{seconds:5.1f}s", flush=True)
        utils.atomic_save({"run": run,
                           "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(),
                           "rng": utils.rng_states(generator), "metrics": metrics},
                          files["checkpoint"])

    _, metrics["train_eval_acc"], _ = utils.test(step_model, train_images, train_labels,
                                                 amp=run["amp"])
    utils.atomic_save(model.state_dict(), files["model"])
    utils.atomic_write_text(json.dumps(metrics, indent=1) + "\n", files["metrics"])
    draw_figures(step_model, metrics, files, test_images, test_labels)


def draw_figures(model, metrics, files, test_images, test_labels):
    """The variant's curves and its grid of misclassified test images."""
    # The run's own precision; runs made before it was recorded: float32.
    _, _, predictions = utils.test(model, test_images, test_labels, amp=metrics.get("amp", False))
    utils.plot_curves(metrics, files["curves"])
    utils.plot_misclassified(test_images, test_labels, predictions, files["misclassified"],
                             f"{metrics['norm'].upper()}: misclassified {metrics['eval_split']} images")


def redraw_variant(norm, args, data, device):
    """--plots-only: the figures again, from the finished run's metrics and weights."""
    files = output_files(norm, args)
    if not files["metrics"].exists():
        return
    metrics = json.loads(files["metrics"].read_text())
    # The run's own blocks and activation, whatever the options say now (and for runs
    # made before those options, what they used then).
    recipe = summarize.recipe(metrics)
    model = Net(norm, recipe["blocks"], activation=recipe["activation"])
    model = model.to(device, memory_format=utils.memory_format(device))
    model.load_state_dict(torch.load(files["model"], map_location=device))
    draw_figures(model, metrics, files, *(t.to(device) for t in data["test"]))


def write_report(args):
    """results.md and comparison.png from every variant finished in OUT_DIR."""
    paths = [output_files(norm, args)["metrics"] for norm in NORMS]
    all_metrics = [json.loads(path.read_text()) for path in paths if path.exists()]
    if not all_metrics:
        raise UserError(f"no finished run in {args.out_dir} to report on")
    table = utils.results_table(all_metrics)
    utils.atomic_write_text(table, args.out_dir / "results.md")
    utils.plot_comparison(all_metrics, args.images_dir / "comparison.png")
    print("\n" + table)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror}); "
                        "choose another --out-dir / --images-dir") from None


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        for folder in (args.out_dir, args.images_dir):
            check_writable(folder)
        start = time.perf_counter()
        data = utils.load_cifar10(args.data_dir, args.cache_dir)
        if args.val_split:
            data = utils.hold_out(data, args.val_split)
        print(utils.describe(args.device))
        print(f"data: {data['source']}: {len(data['train'][1]):,} train, "
              f"{len(data['test'][1]):,} test images ({time.perf_counter() - start:.1f}s)")
        if args.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for norm in NORMS if args.norm == "all" else [args.norm]:
            (redraw_variant if args.plots_only else run_variant)(norm, args, data, args.device)
        write_report(args)
        seconds = time.perf_counter() - start
        print(f"done in {seconds / 60:.1f} min ({seconds:.0f} s)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except utils.NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        command = " ".join(["python", *sys.argv])
        print(f"\ninterrupted: the checkpoint of the last finished epoch is kept in {args.out_dir}; "
              f"resume with: {command}{'' if args.resume else ' --resume'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
