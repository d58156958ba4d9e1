"""Train the CIFAR-10 network with BatchNorm, LayerNorm or GroupNorm and report.

    python train.py --norm bn      # one variant
    python train.py                # all three (at the same time on a GPU), then the comparison

Outputs (see README, "Usage"): <out-dir>/<norm>/{metrics.json, model.pt,
checkpoint.pt}, <out-dir>/results.md, and in <images-dir> each variant's curves,
misclassified images, confusion matrix and Grad-CAM maps, and the figures that compare them.
"""
import startup

if __name__ == "__main__":  # before the imports below, which take seconds
    startup.stop_quietly_while_starting()

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
from pathlib import Path

import torch

import checkpoints
import cli
import devices
import recipe
import reports
import utils
from models import NORMS, ModelFileError, count_parameters, load
from utils import UserError


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.Parser(description="Train the small CIFAR-10 network with BatchNorm (bn), "
                                    "LayerNorm (ln) or GroupNorm (gn) and report how it did.")
    parser.add_argument("--norm", choices=[*NORMS, "all"], default="all",
                        help="normalization variant to train (default: all three: in turn on a "
                             "CPU, at the same time on a GPU)")
    cli.add_recipe_options(parser)
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=cli.seed_int, default=0,
                       help="0 to 2**32-1; seed N > 0 writes to OUT_DIR/seedN (default: %(default)s)")
    seeds.add_argument("--seeds", type=cli.seed_int, nargs="+", metavar="SEED",
                       help="train every norm with each seed, each run where --seed would put "
                            "it, then compare over the seeds (OUT_DIR/seeds.md, seeds.png); on "
                            "a CPU of several cores, runs side by side, one thread each")
    parser.add_argument("--val-split", type=cli.non_negative_int, default=0, metavar="N",
                        help="hold out N training images (the same N for every seed) and evaluate "
                             "on them instead of the test set, to choose hyperparameters "
                             "(default: 0, evaluate on the test set)")
    cli.add_data_options(parser)
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="metrics, weights and checkpoints go to OUT_DIR/<norm>/ (default: %(default)s)")
    parser.add_argument("--images-dir", type=Path,
                        help="where the figures go (default: OUT_DIR/images)")
    cli.add_device_options(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue each variant from its checkpoint in OUT_DIR, where there is one")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in OUT_DIR")
    parser.add_argument("--plots-only", action="store_true",
                        help="train nothing: redraw the figures and results table of the runs "
                             "finished in OUT_DIR")
    args = parser.parse_args(argv)
    cli.resolve_device(parser, args)
    cli.check_norm_options(parser, args, NORMS if args.norm == "all" else [args.norm])
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; pick one")
    args.images_dir = args.images_dir or args.out_dir / "images"
    args.seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    return args


def seed_args(args, seed):
    """The options of the runs of one seed: seed 0 writes to OUT_DIR and IMAGES_DIR,
    seed N to OUT_DIR/seedN and IMAGES_DIR/seedN."""
    def folder(path):
        return path if seed == 0 else path / f"seed{seed}"
    return argparse.Namespace(**{**vars(args), "seed": seed, "out_dir": folder(args.out_dir),
                                 "images_dir": folder(args.images_dir)})


# ----------------------------------------------------------------------------
# One variant
# ----------------------------------------------------------------------------

def output_files(norm, args):
    run_dir = args.out_dir / norm
    return {"metrics": run_dir / "metrics.json", "model": run_dir / "model.pt",
            "checkpoint": run_dir / "checkpoint.pt",
            "curves": args.images_dir / f"{norm}_curves.png",
            "misclassified": args.images_dir / f"{norm}_misclassified.png",
            "confusion": args.images_dir / f"{norm}_confusion.png",
            "gradcam": args.images_dir / f"{norm}_gradcam.png"}


def report_files(args):
    """The files of the report over all of a seed's variants (write_report)."""
    return [args.out_dir / "results.md",
            *(args.images_dir / name for name in reports.COMPARISON_FIGURES),
            args.images_dir / "comparison.png"]


FIGURES_OWNER = ".figures-of"  # in IMAGES_DIR: the OUT_DIR whose runs the figures show


def claim_images_dir(args):
    """Make IMAGES_DIR the figures of OUT_DIR's runs. Figures there of another OUT_DIR's
    runs are not replaced without --overwrite (UserError)."""
    owner_file, out_dir = args.images_dir / FIGURES_OWNER, str(args.out_dir.resolve())
    owner = owner_file.read_text() if owner_file.is_file() else out_dir
    if owner != out_dir and not args.overwrite and any(args.images_dir.glob("*.png")):
        raise UserError(f"{args.images_dir} holds the figures of the runs in {owner}; pass "
                        "--overwrite to replace them, or choose another --images-dir")
    if owner_file.is_file() and owner == out_dir:
        return
    utils.atomic_write_text(out_dir, owner_file)


def check_not_clobbering(files, args):
    run_dir = files["metrics"].parent
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, where the run's folder must go; move it "
                        "away, or choose another --out-dir")
    if args.overwrite or (args.resume and files["checkpoint"].exists()):
        return
    existing = [str(path) for path in files.values() if path.exists()]
    if existing:
        hint = "--resume to continue it, " if files["checkpoint"].exists() else ""
        raise UserError(f"an earlier run's outputs are in the way ({', '.join(existing[:2])}"
                        f"{' ...' if len(existing) > 2 else ''}); pass {hint}--overwrite to "
                        "replace them, or choose another --out-dir")


# What identifies a run's data: its content, not its path (utils.load_cifar10).
DATA_KEYS = ("data_digest", "train_size", "test_size")


def restore(checkpoint, run, model, optimizer, scheduler, generator, path):
    """Load a checkpoint (checkpoints.load_checkpoint) into the run, or raise UserError."""
    # The data must be the same too: the options say nothing of it.
    saved_run = {**checkpoint["run"], **{key: checkpoint["metrics"].get(key) for key in DATA_KEYS}}
    if (different := [key for key in [*recipe.RUN_OPTIONS, *DATA_KEYS]
                      if saved_run.get(key) != run[key]]):
        shown = {key: "other images" if key == "data_digest" else repr(saved_run.get(key))
                 for key in different}
        raise UserError(f"{path} was made with other options or data "
                        + ", ".join(f"{key}={value}" for key, value in shown.items())
                        + "; resume with the same options and data, or pass --overwrite to "
                        "start afresh")
    try:
        model.load_state_dict(checkpoint["model"])
    except ModelFileError as error:
        raise UserError(f"{path} holds weights of a different model ({error}); "
                        "pass --overwrite to start afresh") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        checkpoints.set_rng_states(checkpoint["rng"], generator)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise UserError(f"{path} holds a malformed optimizer, schedule or random state "
                        f"({type(error).__name__}); pass --overwrite to start afresh") from None
    return checkpoint["metrics"]


def machine(device):
    """What a run ran on, for its metrics: timings depend on it."""
    return {"device": str(device), "processor": devices.processor_name(device),
            # a str: torch's own version class is no type weights_only loading accepts
            "torch": str(torch.__version__), "threads": torch.get_num_threads()}


class Training:
    """One variant trained with one seed (args.seed): its model, optimizer, schedule and
    random generator, taken up from its checkpoint with --resume, and its record.
    summary: print torchsummary's table of the model first."""

    def __init__(self, norm, args, data, summary=True):
        self.norm, self.args = norm, args
        self.name = norm if len(args.seeds) == 1 else f"{norm} seed {args.seed}"
        self.files = output_files(norm, args)
        checkpoint = checkpoints.load_checkpoint(self.files["checkpoint"]) if (
            args.resume and self.files["checkpoint"].exists()) else None
        device = args.device

        checkpoints.seed_everything(args.seed)
        self.options = run = recipe.run_options(norm, args)
        model = recipe.make_model(run)
        params = count_parameters(model)
        print(f"\n=== {self.name.upper()}: {params:,} trainable parameters ===")
        if checkpoint is None and summary:
            import torchsummary
            # On the CPU, before the move: on CUDA torchsummary would put its input on cuda:0
            # whatever the device, and cuDNN would tune its algorithms for a batch of 2.
            torchsummary.summary(model.eval(), (3, 32, 32), device="cpu")
            checkpoints.seed_everything(args.seed)  # the summary's forward pass drew random numbers
        self.model = model.to(device, memory_format=devices.memory_format(device))

        train_images, train_labels = data["train"]
        self.optimizer = recipe.make_optimizer(run, model)
        self.scheduler = recipe.schedule(
            self.optimizer, args.epochs * math.ceil(len(train_labels) / args.batch_size))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(args.seed)

        self.metrics = {**run, "params": params, **machine(device), "cuda_graph": args.cuda_graph,
                        "data_source": data["source"], "data_digest": data["digest"],
                        "eval_split": data["eval_split"],
                        "train_size": len(train_labels), "test_size": len(data["test"][1]),
                        "train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [],
                        "epoch_seconds": []}
        if checkpoint is not None:
            data_identity = {key: self.metrics[key] for key in DATA_KEYS}
            self.metrics = restore(checkpoint, {**run, **data_identity}, model, self.optimizer,
                                   self.scheduler, self.generator, self.files["checkpoint"])
            print(f"resuming from epoch {self.epochs_done} of {args.epochs}")
            # The run's machine fields say where it started; its epoch_seconds from here
            # on may come from another machine.
            if self.epochs_done < args.epochs:
                self.metrics.setdefault("resumed", []).append(
                    {"epoch": self.epochs_done + 1, **machine(device)})
        elif args.overwrite:
            # The old run's outputs go first: an interrupted --overwrite must not leave
            # them beside the new run's checkpoint.
            for path in self.files.values():
                path.unlink(missing_ok=True)
        self.step_model = torch.compile(model) if args.compile else model
        self.step = recipe.make_step(run, self.step_model, self.optimizer, train_images,
                                     train_labels, self.generator, cuda_graph=args.cuda_graph)

    @property
    def epochs_done(self):
        return len(self.metrics["train_loss"])

    def end_epoch(self, result, seconds, data):
        """Record the epoch just trained, whose utils.train result is `result`: evaluate,
        print a line, write the checkpoint. Raises NonFiniteLoss for a failed epoch,
        whose run keeps the checkpoint of the epoch before."""
        epoch = self.epochs_done + 1
        if isinstance(result, utils.NonFiniteLoss):
            kept = (f"The checkpoint of epoch {epoch - 1} ({self.files['checkpoint']}) is kept"
                    if epoch > 1 else "No epoch had finished, so there is no checkpoint")
            raise utils.NonFiniteLoss(f"{self.name}: the loss became NaN or infinite in epoch "
                                      f"{epoch}, {result}. {kept}; try a lower --lr")
        train_loss, train_acc = result
        start = time.perf_counter()
        test_loss, test_acc, _ = utils.test(self.step_model, *data["test"], amp=self.options["amp"])
        seconds += time.perf_counter() - start
        for key, value in [("train_loss", train_loss), ("train_acc", train_acc),
                           ("test_loss", test_loss), ("test_acc", test_acc),
                           ("epoch_seconds", seconds)]:
            self.metrics[key].append(value)
        print(f"{self.name} epoch {epoch:2d}/{self.args.epochs}  train loss {train_loss:.4f} "
              f"acc {100 * train_acc:5.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:5.2f}%  "
              f"{seconds:5.1f}s", flush=True)
        checkpoints.save_checkpoint(
            {"run": self.options, "model": self.model.state_dict(),
             "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "rng": checkpoints.rng_states(self.generator), "metrics": self.metrics},
            self.files["checkpoint"])

    def finish(self, data):
        """The accuracy on the training images, then the model and metrics files."""
        _, self.metrics["train_eval_acc"], _ = utils.test(self.step_model, *data["train"],
                                                          amp=self.options["amp"])
        images, labels = data["test"]
        tta = utils.probabilities(self.step_model, images, amp=self.options["amp"], flip_tta=True)
        self.metrics[reports.TTA] = (tta.argmax(1) == labels).float().mean().item()
        utils.atomic_save(self.model.state_dict(), self.files["model"])  # it names the network
        utils.atomic_write_text(json.dumps(self.metrics, indent=1) + "\n", self.files["metrics"])


def train_together(trainings, data, runs_at_once=None):
    """Run `trainings` (Training) to the end, all at the same time (utils.train: on a GPU
    their kernels overlap), each from where it stands. runs_at_once: how many runs share
    the machine, for the record, since it sets epoch_seconds (default: these)."""
    args = trainings[0].args
    for training in trainings:
        training.metrics["runs_at_once"] = runs_at_once or len(trainings)
    for epoch in range(1, args.epochs + 1):
        # a resumed run may be ahead of the others
        due = [training for training in trainings if training.epochs_done < epoch]
        if not due:
            continue
        start = time.perf_counter()
        desc = f"{due[0].name if len(due) == 1 else f'{len(due)} runs'} epoch {epoch}"
        results = utils.train([training.step for training in due],
                              [training.scheduler for training in due], args.batch_size, desc=desc)
        seconds = time.perf_counter() - start
        failed = []
        for training, result in zip(due, results):
            try:
                training.end_epoch(result, seconds, data)
            except utils.NonFiniteLoss as error:
                failed.append(error)  # the others' epoch is saved first
        if failed:
            raise failed[0]
    for training in trainings:
        training.finish(data)


def on_device(data, device):
    """The data with both splits' images and labels on `device`: moved once, shared by
    the runs and the report."""
    return {**data, **{split: tuple(t.to(device) for t in data[split])
                       for split in ("train", "test")}}


def finished_runs(args):
    """{norm: metrics} of every variant finished in OUT_DIR."""
    runs = {}
    for norm in NORMS:
        path = output_files(norm, args)["metrics"]
        if path.exists():
            runs[norm] = reports.read_metrics(path)
    return runs


def record_flip_tta(runs, tta_probabilities, labels, args):
    """Add the flip-TTA accuracy to the metrics.json of runs finished before train.py
    recorded it, from their model files (tta_probabilities: reports.predict's)."""
    for norm, metrics in runs.items():
        if reports.TTA not in metrics:
            metrics[reports.TTA] = (tta_probabilities[norm.upper()].argmax(1) == labels).float().mean().item()
            utils.atomic_write_text(json.dumps(metrics, indent=1) + "\n",
                                    output_files(norm, args)["metrics"])
            print(f"{output_files(norm, args)['metrics']}: added its flip-TTA accuracy")


def write_report(args, data):
    """The figures of every variant finished in OUT_DIR (curves, misclassified images,
    confusion matrix), the figures that compare them, and results.md."""
    runs = finished_runs(args)
    if not runs:
        raise UserError(f"no finished run in {args.out_dir} to report on")
    images, labels = data["test"]  # on the device (on_device)
    models = {}
    for norm, metrics in runs.items():
        try:
            models[norm.upper()] = load(output_files(norm, args)["model"], args.device)
        except ModelFileError as error:
            raise UserError(f"{error}; train it again with --overwrite") from None
    # The run's own precision; runs made before it was recorded: float32.
    precisions = {norm.upper(): metrics.get("amp", False) for norm, metrics in runs.items()}
    probabilities = reports.predict(models, images, precisions)
    record_flip_tta(runs, reports.predict(models, images, precisions, flip_tta=True), labels, args)
    eval_split = next(iter(runs.values()))["eval_split"]
    for norm, metrics in runs.items():
        files = output_files(norm, args)
        utils.plot_curves(metrics, files["curves"])
        utils.plot_misclassified(images, labels, probabilities[norm.upper()].argmax(1),
                                 files["misclassified"],
                                 f"{norm.upper()}: misclassified {eval_split} images")
    per_class = reports.compare(models, probabilities, images, labels, args.images_dir, eval_split)
    all_metrics = list(runs.values())
    utils.plot_comparison({norm.upper(): [m] for norm, m in runs.items()},
                          args.images_dir / "comparison.png", reports.recipe_title(all_metrics))
    table = reports.results_table(all_metrics) + f"\n{eval_split} accuracy per class:\n\n" + per_class
    utils.atomic_write_text(table, args.out_dir / "results.md")
    print("\n" + table)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGINT, cli.stop)
    signal.signal(signal.SIGTERM, cli.stop)
    runs = [seed_args(args, seed) for seed in args.seeds]
    try:
        with contextlib.ExitStack() as locks:
            for run in runs:
                cli.check_writable(run.out_dir, "--out-dir")
                cli.check_writable(run.images_dir, "--images-dir")
                locks.enter_context(checkpoints.FolderLock(run.out_dir))
                if run.images_dir.resolve() != run.out_dir.resolve():
                    locks.enter_context(checkpoints.FolderLock(run.images_dir, "--images-dir"))
                for folder in (run.out_dir, run.images_dir):
                    utils.remove_stale_temporaries(folder)
            train_and_report(args, runs)
    except UserError as error:
        cli.fail(error)
    except utils.NonFiniteLoss as error:
        cli.fail(error, code=1)
    except KeyboardInterrupt:
        print("\ninterrupted: " + interrupted_message(args, runs), file=sys.stderr)
        sys.exit(130)  # the stop handlers stay: a second signal must not cut the exit short
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted_message(args, runs):
    """What an interrupt kept, read from the checkpoints themselves, and how to resume."""
    norms = NORMS if args.norm == "all" else [args.norm]
    kept = []
    for path in (output_files(norm, run)["checkpoint"] for run in runs for norm in norms):
        with contextlib.suppress(UserError):
            if path.exists():
                epoch = len(checkpoints.load_checkpoint(path)["metrics"]["train_loss"])
                kept.append(f"{path} (epoch {epoch})")
    if args.plots_only or not kept:
        return "no epoch had finished, so no checkpoint was written"
    command = [word for word in ["python", *sys.argv] if word != "--overwrite"]
    return (f"the checkpoints of the last finished epochs are kept ({', '.join(kept)}); "
            f"resume with: {' '.join(command)}{'' if args.resume else ' --resume'}")


def train_and_report(args, runs):
    """Train every norm asked for with the seed of each of `runs` (seed_args), then
    write each seed's report and, over several seeds, the seeds' comparison."""
    start = time.perf_counter()
    if args.plots_only and not any(finished_runs(run) for run in runs):
        raise UserError(f"no finished run in {args.out_dir} to report on")
    norms = [] if args.plots_only else NORMS if args.norm == "all" else [args.norm]
    pairs = [(norm, run) for run in runs for norm in norms]
    for norm, run in pairs:  # all of them before any trains
        check_not_clobbering(output_files(norm, run), run)
    for run in runs:
        claim_images_dir(run)
        if args.overwrite and pairs:
            # The old report goes first: an interrupted --overwrite must not leave it
            # beside the new runs' checkpoints.
            for path in report_files(run):
                path.unlink(missing_ok=True)
    data = utils.load_cifar10(args.data_dir, args.cache_dir)
    if args.val_split:
        data = utils.hold_out(data, args.val_split)
    print(devices.describe(args.device))
    print(f"data: {data['source']}: {len(data['train'][1]):,} train, "
          f"{len(data['test'][1]):,} test images ({time.perf_counter() - start:.1f}s)")
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = on_device(data, args.device)
    summary = len(runs) == 1  # one table per norm, not per seed
    training_start = time.perf_counter()
    side_by_side = min(len(pairs), torch.get_num_threads()) if (
        args.device.type == "cpu" and len(runs) > 1 and "fork" in mp.get_all_start_methods()) else 1
    if args.device.type == "cuda" and len(pairs) > 1:
        print(f"{len(pairs)} runs at the same time on {args.device}, their kernels side by side "
              "(docs/performance.md)")
        train_together([Training(norm, run, data, summary) for norm, run in pairs], data)
    elif side_by_side > 1:
        print(f"{len(pairs)} runs, {side_by_side} at a time side by side, one thread each: "
              "on a CPU this trains more images per second than one run on every core "
              "(docs/performance.md)")
        train_side_by_side(pairs, data, side_by_side)
    elif pairs:
        for norm, run in pairs:
            train_together([Training(norm, run, data, summary)], data)
    training_seconds = time.perf_counter() - training_start
    for run in runs:
        if finished_runs(run):
            write_report(run, data)
    if len(runs) > 1:
        write_seeds_report(args, runs)
    seconds = time.perf_counter() - start
    print(f"done in {seconds / 60:.1f} min ({seconds:.0f} s, of which training "
          f"{training_seconds:.0f} s)")


def train_side_by_side(pairs, data, processes):
    """Train each (norm, seed's options) of `pairs`, `processes` at a time,
    each in a process of its own on one thread. The processes are forked: they share
    the data, and the locks this process holds. The first to fail stops the others
    from starting, and its error becomes this run's."""
    context = mp.get_context("fork")
    waiting, running, failed = list(pairs), {}, None
    try:
        while waiting or running:
            while waiting and len(running) < processes and failed is None:
                norm, run = waiting.pop(0)
                process = context.Process(target=run_in_child,
                                          args=(norm, run, data, processes, os.getpid()))
                process.start()
                running[process.sentinel] = process, norm, run
            if not running:
                break
            for sentinel in mp.connection.wait(list(running)):
                process, norm, run = running.pop(sentinel)
                process.join()
                if process.exitcode != 0 and failed is None:
                    failed = process.exitcode, f"{norm}, seed {run.seed}"
    finally:
        for process, _, _ in running.values():  # an interrupt: each keeps its checkpoint
            process.terminate()
        for process, _, _ in running.values():
            process.join()
    if failed is not None:
        code, which = failed
        if code == 130:
            raise KeyboardInterrupt
        print(f"error: the run of {which} failed (its message is above)", file=sys.stderr)
        sys.exit(code if code in (1, 2) else 1)


def run_in_child(norm, run, data, processes, parent):
    """A forked process's one run, on one thread, beside `processes` - 1 others; its
    errors as train.py's, its exit code as the parent reads it. It stops, keeping its
    checkpoint, when its parent (pid `parent`) dies."""
    torch.set_num_threads(1)
    try:
        cli.stop_with_parent(parent)
        train_together([Training(norm, run, data, summary=False)], data,
                       runs_at_once=processes)
    except UserError as error:
        cli.fail(error)
    except utils.NonFiniteLoss as error:
        cli.fail(error, code=1)
    except KeyboardInterrupt:
        sys.exit(130)


def write_seeds_report(args, runs):
    """OUT_DIR/seeds.md (mean and range over the seeds) and IMAGES_DIR/seeds.png (the
    curves' mean and range) over the seeds' finished runs."""
    by_norm = {}
    for run in runs:
        for norm, metrics in finished_runs(run).items():
            by_norm.setdefault(norm, []).append(metrics)
    if not by_norm:
        return
    table = reports.seeds_table({norm.upper(): seeds for norm, seeds in by_norm.items()})
    utils.atomic_write_text(table, args.out_dir / "seeds.md")
    all_metrics = [m for seeds in by_norm.values() for m in seeds]
    utils.plot_comparison({norm.upper(): seeds for norm, seeds in by_norm.items()},
                          args.images_dir / "seeds.png", reports.recipe_title(all_metrics))
    print("\nover the seeds:\n\n" + table)


if __name__ == "__main__":
    main()
