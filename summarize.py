"""Tables over finished train.py runs: several seeds of one recipe, an ablation, or
the time runs took; and the pages that show them, kept up to date.

    python summarize.py results results/seed1 results/seed2 > results/seeds.md
    python summarize.py --ablation results/ablation/runs.txt
    python summarize.py --times results/speed/zen5 results/gpu/h200-2026-12-04
    python summarize.py --include results/speed/zen5/bench-1.txt
    python summarize.py --update README.md docs/*.md

--update regenerates every table of a page that stands between
`<!-- summarize.py ARGS -->` and `<!-- end -->`: the output of summarize.py ARGS.

Seeds: each folder holds <norm>/metrics.json for the variants it ran; runs that
differ in anything but the seed are refused, as their mean would mean nothing.
Ablation: one row per run of a list, in its order, each compared with the
baseline the list names for it, so every row names the change it made.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import recipe
import reports
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
        runs[norm.upper()] = metrics
    if not runs:
        sys.exit("summarize.py: error: no <norm>/metrics.json in the folders given")
    return reports.seeds_table(runs)


def changes(metrics, reference):
    """The recipe entries (and seed) of `metrics` that differ from `reference`, as 'key
    old -> new'; a norm's own option not where the norm changed, as that says it."""
    a = {**recipe.of_run(reference), "seed": reference["seed"]}
    b = {**recipe.of_run(metrics), "seed": metrics["seed"]}
    implied = recipe.NORM_OPTIONS if a["norm"] != b["norm"] else {}
    return [f"{key} {a.get(key)} -> {b.get(key)}" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key) and key not in implied]


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


def times(folders):
    """A markdown table: for each train.py output folder, where it ran and how long
    its variants trained (the sum of their epochs' seconds)."""
    lines = ["| run | device | torch, threads | s/epoch BN / LN / GN | training, all three |",
             "|---|---|---|---:|---:|"]
    for folder in folders:
        runs = [json.loads((folder / norm / "metrics.json").read_text()) for norm in NORMS
                if (folder / norm / "metrics.json").exists()]
        if not runs:
            sys.exit(f"summarize.py: error: no <norm>/metrics.json in {folder}")
        per_epoch = " / ".join(f"{sum(m['epoch_seconds']) / len(m['epoch_seconds']):.1f}"
                               for m in runs)
        total = sum(sum(m["epoch_seconds"]) for m in runs)
        m = runs[0]
        graphs = ", CUDA graphs" if m.get("cuda_graph") else ""
        lines.append(f"| `{folder}` | {m['processor']}{graphs} | {m['torch']}, "
                     f"{m['threads']} | {per_epoch} | {total / 60:.1f} min ({total:.0f} s) |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        help="output folders of train.py runs, one per seed")
    parser.add_argument("--ablation", type=Path, metavar="LIST",
                        help="instead, one row per run of LIST, with the change it made "
                             "against its baseline (see results/ablation/runs.txt)")
    parser.add_argument("--include", type=Path, metavar="FILE",
                        help="instead, FILE: a committed output shown in a page (a .md file "
                             "as it is, any other in a code block)")
    parser.add_argument("--times", action="store_true",
                        help="instead, where each folder's runs ran and how long they trained")
    parser.add_argument("--update", action="store_true",
                        help="instead, regenerate the tables in the pages (the FOLDERS "
                             "arguments) between <!-- summarize.py ARGS --> and <!-- end -->")
    args = parser.parse_args(argv)
    single = bool(args.ablation) + bool(args.include)
    modes = single + args.times + args.update
    if modes > 1 or (modes == 0 and not args.folders) or (single and args.folders):
        parser.error("give seed folders, or --ablation LIST, --include FILE, --times FOLDERS "
                     "or --update PAGES")
    return args


def table(argv):
    """The table that summarize.py ARGV prints."""
    args = parse_args(argv)
    if args.ablation:
        return ablation(args.ablation)
    if args.include:  # a markdown file as it is, any other in a code block
        text = args.include.read_text()
        return text if args.include.suffix == ".md" else f"```\n{text}```\n"
    return times(args.folders) if args.times else seeds(args.folders)


GENERATED = re.compile(r"(<!-- summarize\.py (.*?) -->\n).*?(<!-- end -->)", re.DOTALL)


def regenerate(page):
    """The page's text with every generated table made again."""
    return GENERATED.sub(lambda m: m[1] + table(m[2].split()) + m[3], page)


def main(argv=None):
    args = parse_args(argv)
    if not args.update:
        print(table(argv), end="")
        return
    for page in args.folders:
        text = page.read_text()
        if (new := regenerate(text)) != text:
            page.write_text(new)
            print(f"updated {page}")


if __name__ == "__main__":
    main()
