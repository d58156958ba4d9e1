"""Tables over finished train.py runs: several seeds of one recipe, or an ablation.

    python summarize.py results results/seed1 results/seed2 > results/seeds.md
    python summarize.py --ablation results/ablation/*/metrics.json

Seeds: each folder holds <norm>/metrics.json for the variants it ran; runs that
differ in anything but the seed are refused, as their mean would mean nothing.
Ablation: one row per metrics file, in the order given, each compared with the
first row above it whose recipe is closest, so every row names the change it made.
"""
import argparse
import json
import sys
from pathlib import Path

from models import NORMS

# What may differ between the runs of one recipe.
PER_RUN = {"seed", "train_acc", "train_loss", "test_acc", "test_loss", "train_eval_acc",
           "epoch_seconds", "threads", "device", "processor", "torch", "cuda_graph"}


# Options that older runs did not record, with the value those runs used: --blocks
# (before it, plain blocks), --amp (before it was recorded, float32 unless the log's
# command line says --amp), and the options of results/ablation/levers.patch, the
# experiments that were measured and not kept (their defaults are the project's code).
RECORDED_LATER = {"blocks": "plain", "amp": False, "activation": "relu", "ema": 0.0,
                  "wd_all": 1, "gn_groups": 4, "whiten": 0}


def recipe(metrics):
    return {**RECORDED_LATER, **{k: v for k, v in metrics.items() if k not in PER_RUN}}


def seeds(folders):
    runs = {}
    for norm in NORMS:
        paths = [folder / norm / "metrics.json" for folder in folders]
        metrics = [json.loads(path.read_text()) for path in paths if path.exists()]
        if not metrics:
            continue
        different = [m["seed"] for m in metrics if recipe(m) != recipe(metrics[0])]
        if different:
            sys.exit(f"summarize.py: error: {norm} runs with seeds {different} use another "
                     f"recipe than seed {metrics[0]['seed']}")
        runs[norm] = metrics
    if not runs:
        sys.exit("summarize.py: error: no <norm>/metrics.json in the folders given")
    return seeds_table(runs)


def seeds_table(runs):
    """A markdown table over several seeds of the same recipe.

    `runs` maps each variant's name to its list of metrics, one per seed.
    Final test (or validation) accuracy as mean and range; train accuracy of
    the final weights on the un-augmented training images, as mean.
    """
    any_run = next(iter(runs.values()))[0]
    split = any_run["eval_split"]
    lines = [f"| model | params | seeds | {split} acc, mean | {split} acc, min / max "
             f"| train acc (final weights), mean |",
             "|---|---:|---:|---:|---:|---:|"]
    for norm, metrics in runs.items():
        final = [100 * m["test_acc"][-1] for m in metrics]
        train = [100 * m["train_eval_acc"] for m in metrics]
        seed_list = ", ".join(str(m["seed"]) for m in metrics)
        lines.append(f"| {norm.upper()} | {metrics[0]['params']:,} | {seed_list} "
                     f"| {sum(final) / len(final):.2f}% | {min(final):.2f}% / {max(final):.2f}% "
                     f"| {sum(train) / len(train):.2f}% |")
    return "\n".join(lines) + "\n"


def changes(metrics, reference):
    """The recipe entries (and seed) of `metrics` that differ from `reference`, as 'key old -> new'."""
    a = {**recipe(reference), "seed": reference["seed"]}
    b = {**recipe(metrics), "seed": metrics["seed"]}
    return [f"{key} {a.get(key)} -> {b.get(key)}" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key)]


def run_name(path):
    """The folder that names a run: x for x/metrics.json, x/gn for train.py's x/gn/metrics.json."""
    folder = Path(path).parent
    return f"{folder.parent.name}/{folder.name}" if folder.name in NORMS else folder.name


def ablation(paths):
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        sys.exit(f"summarize.py: error: no such metrics file: {', '.join(missing)}")
    rows = [json.loads(Path(path).read_text()) for path in paths]
    split = rows[0]["eval_split"]
    lines = [f"| run | change (vs the closest run above) | {split} acc | gain "
             "| train acc (final weights) |", "|---|---|---:|---:|---:|"]
    for i, (path, metrics) in enumerate(zip(paths, rows)):
        acc = 100 * metrics["test_acc"][-1]
        change, gain = "baseline", ""
        if i > 0:
            # The first run above with the fewest differences: list the main line first.
            reference = min(rows[:i], key=lambda r: len(changes(metrics, r)))
            change = ", ".join(changes(metrics, reference)) or "none (a repeat)"
            gain = f"{acc - 100 * reference['test_acc'][-1]:+.2f}"
        lines.append(f"| {run_name(path)} | {change} | {acc:.2f}% | {gain} "
                     f"| {100 * metrics['train_eval_acc']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="output folders of train.py runs (metrics.json files with --ablation)")
    parser.add_argument("--ablation", action="store_true",
                        help="one row per metrics file, each with the change it made")
    args = parser.parse_args(argv)
    print(ablation(args.paths) if args.ablation else seeds(args.paths), end="")


if __name__ == "__main__":
    main()
