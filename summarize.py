"""Tables over finished train.py runs: several seeds of one recipe, or an ablation.

    python summarize.py results results/seed1 results/seed2 > results/seeds.md
    python summarize.py --ablation results/ablation/runs.txt > results/ablation/ablation.md

Seeds: each folder holds <norm>/metrics.json for the variants it ran; runs that
differ in anything but the seed are refused, as their mean would mean nothing.
Ablation: one row per run of a list, in its order, each compared with the
baseline the list names for it, so every row names the change it made.
"""
import argparse
import json
import sys
from pathlib import Path

import recipe
from models import NORMS

def seeds(folders):
    runs = {}
    for norm in NORMS:
        paths = [folder / norm / "metrics.json" for folder in folders]
        metrics = [json.loads(path.read_text()) for path in paths if path.exists()]
        if not metrics:
            continue
        different = [m["seed"] for m in metrics if recipe.of_run(m) != recipe.of_run(metrics[0])]
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
    a = {**recipe.of_run(reference), "seed": reference["seed"]}
    b = {**recipe.of_run(metrics), "seed": metrics["seed"]}
    return [f"{key} {a.get(key)} -> {b.get(key)}" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key)]


def read_run_list(path):
    """[(run, baseline or None, note)] from an ablation list: one 'RUN [BASELINE] [-- NOTE]'
    a line.

    Each name is a folder beside the list holding that run's metrics.json; a
    baseline must be a run listed above it. NOTE, after a baseline, names a change
    that the metrics do not record (one a scratch patch made). '#' starts a comment.
    """
    if not path.is_file():
        sys.exit(f"summarize.py: error: no such run list: {path}")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        runs, _, note = line.split("#")[0].partition(" -- ")
        words = runs.split()
        listed = [run for run, _, _ in pairs]
        if len(words) > 2 or (len(words) == 2 and words[1] not in listed) or (note and len(words) != 2):
            sys.exit(f"summarize.py: error: {path}:{number}: expected 'RUN [BASELINE] [-- NOTE]' "
                     "with BASELINE a run listed above")
        if words:
            pairs.append((words[0], words[1] if len(words) == 2 else None, note.strip()))
    return pairs


def ablation(list_path):
    pairs = read_run_list(list_path)
    paths = {run: list_path.parent / run / "metrics.json" for run, _, _ in pairs}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        sys.exit(f"summarize.py: error: no such metrics file: {', '.join(missing)}")
    runs = {run: json.loads(path.read_text()) for run, path in paths.items()}
    split = next(iter(runs.values()))["eval_split"]
    lines = [f"| run | against | change | {split} acc | gain | train acc (final weights) |",
             "|---|---|---|---:|---:|---:|"]
    for run, baseline, note in pairs:
        metrics = runs[run]
        acc = 100 * metrics["test_acc"][-1]
        change, gain = "baseline", ""
        if baseline:
            reference = runs[baseline]
            change = ", ".join(([note] if note else []) + changes(metrics, reference))
            change = change or "none (a repeat)"
            gain = f"{acc - 100 * reference['test_acc'][-1]:+.2f}"
        lines.append(f"| {run} | {baseline or ''} | {change} | {acc:.2f}% | {gain} "
                     f"| {100 * metrics['train_eval_acc']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        help="output folders of train.py runs, one per seed")
    parser.add_argument("--ablation", type=Path, metavar="LIST",
                        help="instead, one row per run of LIST, with the change it made "
                             "against its baseline (see results/ablation/runs.txt)")
    args = parser.parse_args(argv)
    if bool(args.ablation) == bool(args.folders):
        parser.error("give either seed folders or --ablation LIST")
    print(ablation(args.ablation) if args.ablation else seeds(args.folders), end="")


if __name__ == "__main__":
    main()
