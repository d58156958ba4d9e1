"""Studies of what each norm averages over: BN's statistics batch, GN's group count.

    python study.py bn-batch  --data-dir ../shared/data/cifar10-jpg   # B = 2 ... 128
    python study.py gn-groups --data-dir ../shared/data/cifar10-jpg   # G = 1 ... per channel

Trains every (setting, seed) run of the study's grid that is not finished yet, with
train.py (one process per run, side by side on a CPU, one thread each; a setting's
seeds together on a GPU), taking up interrupted runs from their checkpoints. The
default recipe's point (B = the batch size, G = 4) reuses the runs in --default-runs.
Then it writes the study's table (OUT_DIR/<study>/results.md) and figure
(IMAGES_DIR/<study>.png). Why and what they show: docs/norm-studies.md.
"""
import startup

if __name__ == "__main__":  # before the imports below, which take seconds
    startup.stop_quietly_while_starting()

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import cli
import models
import recipe
import reports
import utils
from models import GN_GROUPS, PER_CHANNEL
from utils import UserError

ROOT = Path(__file__).resolve().parent

# Each study: the norm it varies, train.py's option and the grid (Wu & He's range, as
# far as this network's widths and batch allow); its default setting: default_setting.
STUDIES = {
    "bn-batch": {"norm": "bn", "option": "--bn-batch", "key": "bn_batch",
                 "grid": (2, 4, 8, 16, 32, 64, 128)},
    "gn-groups": {"norm": "gn", "option": "--gn-groups", "key": "gn_groups",
                  "grid": (1, 2, 4, 8, 16, PER_CHANNEL)},
}
SEEDS = (0, 1, 2)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=STUDIES, help="which study")
    parser.add_argument("--settings", nargs="+", metavar="S",
                        help="only these settings of the grid (default: all of bn-batch's "
                             f"{', '.join(map(str, STUDIES['bn-batch']['grid']))}; of "
                             f"gn-groups's {', '.join(map(str, STUDIES['gn-groups']['grid']))})")
    parser.add_argument("--seeds", type=cli.seed_int, nargs="+", default=list(SEEDS),
                        metavar="SEED", help="default: %(default)s")
    parser.add_argument("--epochs", type=cli.positive_int, default=recipe.EPOCHS,
                        help="default: %(default)s")
    parser.add_argument("--batch-size", type=cli.positive_int, default=recipe.BATCH_SIZE,
                        help="default: %(default)s")
    cli.add_data_options(parser)
    parser.add_argument("--out-dir", type=Path, default=Path("results/studies"),
                        help="the runs go to OUT_DIR/<study>/<setting>/ (default: %(default)s)")
    parser.add_argument("--default-runs", type=Path, default=Path("results"),
                        help="train.py's output folder of the default recipe (seed N in "
                             "seedN/), whose runs are the default setting's (default: %(default)s)")
    parser.add_argument("--images-dir", type=Path, default=Path("images"),
                        help="where the study's figure goes (default: %(default)s)")
    cli.add_device_options(parser, training=False)
    parser.add_argument("--jobs", type=cli.positive_int,
                        help="runs at the same time on a CPU, one thread each (default: one "
                             "per core)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the table and figure of the finished runs")
    args = parser.parse_args(argv)
    cli.resolve_device(parser, args)
    study = STUDIES[args.study]
    grid = [str(s) for s in study["grid"]]
    if args.settings and (unknown := [s for s in args.settings if s not in grid]):
        parser.error(f"{args.study} has no setting {', '.join(unknown)}; choose from "
                     f"{', '.join(grid)}")
    args.settings = [study["grid"][grid.index(s)] for s in dict.fromkeys(args.settings or grid)]
    if args.study == "bn-batch":
        cli.check_bn_batches(parser, "--bn-batch", args.settings, args.batch_size,
                             "; choose --settings that do")
    args.seeds = list(dict.fromkeys(args.seeds))
    args.jobs = args.jobs or (os.cpu_count() or 1 if args.device.type == "cpu" else 1)
    return args


# ----------------------------------------------------------------------------
# The grid's runs
# ----------------------------------------------------------------------------

def default_setting(args):
    """The setting of the default recipe: B = the batch size, G = GN_GROUPS."""
    return args.batch_size if args.study == "bn-batch" else GN_GROUPS


def is_default(args, setting):
    return setting == default_setting(args)


def run_folder(args, setting):
    """train.py's --out-dir of one setting (its seed N in seedN/, as train.py puts it)."""
    return args.default_runs if is_default(args, setting) else (
        args.out_dir / args.study / str(setting))


def metrics_path(args, setting, seed, norm=None):
    folder = run_folder(args, setting)
    return (folder if seed == 0 else folder / f"seed{seed}") / (
        norm or STUDIES[args.study]["norm"]) / "metrics.json"


def default_precision(args):
    """["--amp"] or ["--no-amp"]: the precision of the default setting's finished runs, so
    that every setting trains in it whatever the device's default (bfloat16 on this
    project's CPUs, float32 on GPUs); [] where none is finished."""
    for seed in args.seeds:
        if (path := metrics_path(args, default_setting(args), seed)).exists():
            return ["--amp" if reports.read_metrics(path).get("amp") else "--no-amp"]
    return []


def train_command(args, setting, seeds):
    """train.py's command line for the runs of `setting` with `seeds`."""
    study = STUDIES[args.study]
    folder = run_folder(args, setting)
    return [sys.executable, str(ROOT / "train.py"), "--norm", study["norm"],
            *([] if is_default(args, setting) else [study["option"], str(setting)]),
            *default_precision(args),
            "--seeds", *map(str, seeds), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir),
            "--cache-dir", str(args.cache_dir), "--out-dir", str(folder),
            "--images-dir", str(folder / "images"), "--device", str(args.device),
            *(["--threads", "1"] if args.device.type == "cpu" else []), "--resume"]


def missing_runs(args):
    """[(setting, [seeds])] of the runs to train: one seed each on a CPU (side by side),
    a setting's seeds together on a GPU."""
    # Seed by seed: an interrupted grid has the whole curve of its first seeds.
    missing = [(setting, seed) for seed in args.seeds for setting in args.settings
               if not metrics_path(args, setting, seed).exists()]
    if args.device.type == "cpu":
        return [(setting, [seed]) for setting, seed in missing]
    by_setting = {}
    for setting, seed in missing:
        by_setting.setdefault(setting, []).append(seed)
    return list(by_setting.items())


def train_grid(args, jobs):
    """Run train.py for each of `jobs` (missing_runs), args.jobs at a time, each logging
    to OUT_DIR/<study>/logs/. The first failure stops new ones from starting and ends
    the command with its exit code; an interrupt stops them all, each keeping its
    checkpoint (train.py's SIGTERM)."""
    logs = args.out_dir / args.study / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(jobs), {}, None
    progress = tqdm(total=len(jobs), desc=f"{args.study}: runs", unit="run", disable=None)
    try:
        while waiting or running:
            while waiting and len(running) < args.jobs and failed is None:
                setting, seeds = waiting.pop(0)
                name = f"{setting}-seed{'-'.join(map(str, seeds))}"
                log = open(logs / f"{name}.log", "a")
                process = subprocess.Popen(train_command(args, setting, seeds), stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           preexec_fn=lambda: cli.stop_with_parent(None))
                running[process] = name, log, time.perf_counter()
                tqdm.write(f"{args.study} {name}: started (log {logs / f'{name}.log'})")
            if not running:
                break
            time.sleep(1)
            for process in [p for p in running if p.poll() is not None]:
                name, log, start = running.pop(process)
                log.close()
                minutes = (time.perf_counter() - start) / 60
                progress.update()
                if process.returncode != 0:
                    failed = failed or (process.returncode, name)
                    tqdm.write(f"{args.study} {name}: failed (exit code {process.returncode})")
                else:
                    tqdm.write(f"{args.study} {name}: done in {minutes:.1f} min")
    finally:
        for process in running:  # an interrupt: each run keeps its checkpoint
            process.terminate()
        for process, (_, log, _) in running.items():
            process.wait()
            log.close()
        progress.close()
    if failed is not None:
        code, name = failed
        raise UserError(f"the run {args.study} {name} failed (exit code {code}); its log: "
                        f"{logs / f'{name}.log'}")


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def finished(args, norm=None, settings=None):
    """{setting: [metrics of each finished seed]} of the study's norm (or `norm`)."""
    runs = {}
    for setting in settings or args.settings:
        seeds = [reports.read_metrics(path) for seed in args.seeds
                 if (path := metrics_path(args, setting, seed, norm)).exists()]
        if seeds:
            runs[setting] = seeds
    return runs


def check_one_recipe(args, runs):
    """UserError unless the runs differ in nothing but the study's option and the seed:
    a default run made with another recipe must not stand in the study."""
    key = STUDIES[args.study]["key"]
    recipes = {(setting, m["seed"]): {k: v for k, v in recipe.of_run(m).items()
                                      if k not in (key, "data_source")}
               for setting, seeds in runs.items() for m in seeds}
    first = next(iter(recipes.values()))
    for (setting, seed), other in recipes.items():
        if other != first:
            different = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise UserError(f"the run of {args.study} {setting}, seed {seed} differs from the "
                            f"others in {', '.join(different)}; train it again with the "
                            "study's recipe")


def test_batch_statistics(args):
    """{B: [test accuracy of each default BN run's model evaluated with the statistics of
    batches of B test images, drawn at random]}, for the settings of the grid; {} without
    the models."""
    paths = [metrics_path(args, default_setting(args), seed).parent / "model.pt"
             for seed in args.seeds]
    if not all(path.exists() for path in paths):
        return {}
    data = utils.load_cifar10(args.data_dir, args.cache_dir)
    # In a fixed random order: an image folder lists the test images class by class, and
    # batches of one class would make their statistics a hint of it.
    order = torch.randperm(len(data["test"][1]), generator=torch.Generator().manual_seed(0))
    images, labels = (t[order].to(args.device) for t in data["test"])
    accuracies = {}
    for path in paths:
        try:
            model = models.load(path, args.device)
        except models.ModelFileError as error:
            raise UserError(error) from None
        amp = reports.read_metrics(path.parent / "metrics.json").get("amp", False)
        for b in args.settings:
            with models.batch_statistics(model):
                accuracies.setdefault(b, []).append(
                    utils.test(model, images, labels, batch_size=b, amp=amp)[1])
    return accuracies


def write_report(args):
    runs = finished(args)
    if not runs:
        raise UserError(f"no finished run of {args.study} in {args.out_dir / args.study}")
    check_one_recipe(args, runs)
    study = STUDIES[args.study]
    label = "B" if args.study == "bn-batch" else "G"
    default = default_setting(args)
    table = reports.seeds_table({f"{s} (default)" if s == default else str(s): seeds
                                 for s, seeds in runs.items()}, label)
    # The other norms' default runs: references that do not depend on the setting.
    others = {norm.upper(): seeds for norm in ("bn", "ln", "gn") if norm != study["norm"]
              for seeds in [finished(args, norm, [default]).get(default)] if seeds}
    test_time = test_batch_statistics(args) if args.study == "bn-batch" else {}
    if test_time:
        table += ("\nBN at test time: the default runs (trained with the statistics of all "
                  f"{args.batch_size} images) evaluated with the statistics of each batch of B "
                  "test images instead of their running averages:\n\n"
                  + reports.accuracy_table(test_time, label, "test acc, batch statistics"))
    utils.atomic_write_text(table, args.out_dir / args.study / "results.md")
    cli.check_writable(args.images_dir, "--images-dir")
    utils.plot_study(runs, others, args.study, args.images_dir / f"{args.study.replace('-', '_')}.png",
                     test_time)
    print(f"\n{args.study}:\n\n{table}\nfigure: {args.images_dir / args.study.replace('-', '_')}.png")


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGINT, cli.stop)
    signal.signal(signal.SIGTERM, cli.stop)
    try:
        cli.check_writable(args.out_dir / args.study, "--out-dir")
        with checkpoints.FolderLock(args.out_dir / args.study):
            jobs = [] if args.report_only else missing_runs(args)
            if jobs:
                runs = sum(len(seeds) for _, seeds in jobs)
                print(f"{args.study}: {runs} run(s) to train, "
                      f"{min(args.jobs, len(jobs))} at a time"
                      + (", one thread each" if args.device.type == "cpu" else ""))
                train_grid(args, jobs)
            write_report(args)
    except UserError as error:
        cli.fail(error)
    except KeyboardInterrupt:
        print("\ninterrupted: the runs keep their checkpoints; the same command resumes "
              "them", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    main()
