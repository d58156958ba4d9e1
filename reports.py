"""What is reported over trained models: the results tables, and the figures that
compare models image by image and class by class (train.py's report and evaluate.py)."""
import json
import math
from numbers import Real
from pathlib import Path

import devices
import utils
from models import NORMS
from utils import CLASSES, UserError

# A finished run's metrics.json: the fields the reports read, and their types.
METRICS_FIELDS = {"norm": str, "params": int, "seed": int, "epochs": int, "batch_size": int,
                  "eval_split": str, "train_eval_acc": Real}
METRICS_SERIES = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")


def read_metrics(path):
    """The metrics.json of a finished run at `path`, checked before any of it is used:
    UserError, naming the file, for one that is unreadable or of the wrong shape."""
    def malformed(reason):
        return UserError(f"{path} is not the metrics of a finished run ({reason}); train the "
                         "run again with --overwrite, or move the file away")
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise malformed("not readable JSON") from None
    if not isinstance(metrics, dict):
        raise malformed("not a JSON object")
    for key, kind in METRICS_FIELDS.items():
        value = metrics.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise malformed(f"{key} is missing or not {kind.__name__.lower()}")
    if metrics["norm"] not in NORMS:
        raise malformed(f"unknown norm {metrics['norm']!r}")
    series = [metrics.get(key) for key in METRICS_SERIES]
    if not all(isinstance(values, list) and values and all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
               for values in series) or len({len(values) for values in series}) != 1:
        raise malformed(f"{', '.join(METRICS_SERIES)} must be lists of numbers, one per epoch")
    return metrics


def predict(models, images, precisions):
    """{name: (N, 10) softmax outputs} of each model on the uint8 images.

    models: {name: model}; precisions: {name: whether in bfloat16 (amp)}. Each
    model runs in the device's training layout and its run's precision, so that
    its accuracy is the one the run measured.
    """
    layout = devices.memory_format(images.device)
    return {name: utils.logits(model.to(images.device, memory_format=layout), images,
                               amp=precisions[name]).softmax(1)
            for name, model in models.items()}


COMPARISON_FIGURES = ("per_class.png", "misclassified_compared.png")  # compare() writes


def compare(probabilities, images, labels, images_dir, eval_split="test"):
    """Write, for `probabilities` ({name: softmax outputs}, see predict): each model's
    confusion matrix (<name>_confusion.png), per_class.png and
    misclassified_compared.png into images_dir; return the per-class table."""
    images_dir = Path(images_dir)
    predictions = {name: p.argmax(1) for name, p in probabilities.items()}
    for name, p in predictions.items():
        utils.plot_confusion(labels, p, images_dir / f"{file_name(name)}_confusion.png",
                             f"{name}: confusion matrix on the {eval_split} images")
    accuracies = {name: utils.per_class_accuracy(labels, p) for name, p in predictions.items()}
    utils.plot_per_class(accuracies, images_dir / COMPARISON_FIGURES[0],
                         f"{eval_split} accuracy per class")
    utils.plot_misclassified_compared(
        images, labels, probabilities, images_dir / COMPARISON_FIGURES[1],
        f"{eval_split} images the models disagree on: each model's prediction and confidence")
    return per_class_table(accuracies, labels, predictions)


def recipe_title(all_metrics):
    """A figure's title naming the runs' recipe and seeds, e.g. 'BN, LN, GN: separable
    blocks, muon, 20 epochs of batch 128, seed 0 (test)'."""
    m = all_metrics[0]
    seeds = sorted({m["seed"] for m in all_metrics})
    norms = dict.fromkeys(m["norm"].upper() for m in all_metrics)
    return (", ".join(norms) + f": {m.get('blocks', 'plain')} "
            f"blocks, {m.get('optimizer', 'sgd')}, {m['epochs']} epochs of batch "
            f"{m['batch_size']}, seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))} ({m['eval_split']})")


def file_name(name):
    """A model's name as a file name: 'BN' -> 'bn'."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


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


def study_table(runs, label, default):
    """A markdown table of a study (study.py): one row per setting. runs: {setting:
    [metrics of each seed]}; label: the setting's name (B, G); default: the default
    recipe's setting, marked."""
    split = next(iter(runs.values()))[0]["eval_split"]
    lines = [f"| {label} | seeds | {split} acc, mean | {split} acc, min / max "
             "| train acc (final weights), mean |", "|---|---:|---:|---:|---:|"]
    for setting, metrics in runs.items():
        final = [100 * m["test_acc"][-1] for m in metrics]
        train = [100 * m["train_eval_acc"] for m in metrics]
        name = f"{setting} (default)" if setting == default else str(setting)
        lines.append(f"| {name} | {', '.join(str(m['seed']) for m in metrics)} "
                     f"| {sum(final) / len(final):.2f}% | {min(final):.2f}% / {max(final):.2f}% "
                     f"| {sum(train) / len(train):.2f}% |")
    return "\n".join(lines) + "\n"


def per_class_table(accuracies, labels, predictions):
    """A markdown table: each class's accuracy under each model, side by side, and
    each model's overall accuracy."""
    names = list(accuracies)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k, class_name in enumerate(CLASSES):
        lines.append(f"| {class_name} | "
                     + " | ".join(f"{100 * accuracies[name][k]:.1f}%" for name in names) + " |")
    overall = [(predictions[name] == labels).float().mean().item() for name in names]
    lines.append("| **all** | " + " | ".join(f"**{100 * a:.2f}%**" for a in overall) + " |")
    return "\n".join(lines) + "\n"


def results_table(all_metrics):
    """A markdown table: params, final train and test accuracy per variant.

    Train accuracy twice: averaged over the last epoch's augmented batches,
    and of the final weights on the un-augmented training images.
    """
    split = all_metrics[0]["eval_split"]
    lines = [f"| model | params | train acc (last epoch, augmented) | train acc (final weights) "
             f"| {split} acc | s/epoch |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in all_metrics:
        seconds = sum(m["epoch_seconds"]) / len(m["epoch_seconds"])
        lines.append(f"| {m['norm'].upper()} | {m['params']:,} | {100 * m['train_acc'][-1]:.2f}% "
                     f"| {100 * m['train_eval_acc']:.2f}% | {100 * m['test_acc'][-1]:.2f}% "
                     f"| {seconds:.1f} |")
    return "\n".join(lines) + "\n"
