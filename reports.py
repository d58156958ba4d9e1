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
TTA = "test_acc_flip_tta"  # metrics.json: the final weights' flip-TTA accuracy
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


def predict(models, images, precisions, flip_tta=False):
    """{name: (N, 10) softmax outputs} of each model on the uint8 images; flip_tta:
    averaged with the mirror images' (utils.probabilities).

    models: {name: model}; precisions: {name: whether in bfloat16 (amp)}. Each
    model runs in the device's training layout and its run's precision, so that
    its accuracy is the one the run measured.
    """
    layout = devices.memory_format(images.device)
    return {name: utils.probabilities(model.to(images.device, memory_format=layout), images,
                                      amp=precisions[name], flip_tta=flip_tta)
            for name, model in models.items()}


# The figures compare() writes over all the models, beside each model's own
# <name>_confusion.png and <name>_gradcam.png.
COMPARISON_FIGURES = ("per_class.png", "misclassified_compared.png", "gradcam_compared.png")


def compare(models, probabilities, images, labels, images_dir, eval_split="test"):
    """Write, for `models` ({name: model}) and their `probabilities` ({name: softmax
    outputs}, see predict): each model's confusion matrix (<name>_confusion.png) and
    Grad-CAM maps of its misclassified images (<name>_gradcam.png), and the
    COMPARISON_FIGURES, into images_dir; return the per-class table."""
    images_dir = Path(images_dir)
    predictions = {name: p.argmax(1) for name, p in probabilities.items()}
    for name, p in predictions.items():
        utils.plot_confusion(labels, p, images_dir / f"{file_name(name)}_confusion.png",
                             f"{name}: confusion matrix on the {eval_split} images")
        utils.plot_gradcam(models[name], images, labels, probabilities[name],
                           images_dir / f"{file_name(name)}_gradcam.png",
                           f"{name}: where it looked in misclassified {eval_split} images "
                           "(Grad-CAM of the predicted and of the true class)")
    accuracies = {name: utils.per_class_accuracy(labels, p) for name, p in predictions.items()}
    utils.plot_per_class(accuracies, images_dir / COMPARISON_FIGURES[0],
                         f"{eval_split} accuracy per class")
    utils.plot_misclassified_compared(
        images, labels, probabilities, images_dir / COMPARISON_FIGURES[1],
        f"{eval_split} images the models disagree on: each model's prediction and confidence")
    utils.plot_gradcam_compared(
        models, images, labels, probabilities, images_dir / COMPARISON_FIGURES[2],
        "Grad-CAM of each model's own prediction")
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


def seeds_table(runs, label="model"):
    """A markdown table over several seeds of one recipe, a row per variant (or per
    setting of a study). runs: {row name: [metrics of each seed]}; label: the first
    column's heading.

    Final test (or validation) accuracy as mean and range, the same with flip-TTA
    where every run recorded it (utils.probabilities), and train accuracy of the final
    weights on the un-augmented training images, as mean.
    """
    split = next(iter(runs.values()))[0]["eval_split"]
    tta = all(TTA in m for metrics in runs.values() for m in metrics)
    header = [label, "params", "seeds", f"{split} acc, mean", f"{split} acc, min / max",
              *(["flip-TTA, mean", "flip-TTA, min / max"] if tta else []),
              "train acc (final weights), mean"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, metrics in runs.items():
        cells = [name, f"{metrics[0]['params']:,}", ", ".join(str(m["seed"]) for m in metrics),
                 *mean_and_range([m["test_acc"][-1] for m in metrics]),
                 *(mean_and_range([m[TTA] for m in metrics]) if tta else []),
                 mean_and_range([m["train_eval_acc"] for m in metrics])[0]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_table(accuracies, label, heading):
    """A markdown table of accuracies over seeds: {row name: [accuracy of each seed]} as
    mean and min / max."""
    lines = [f"| {label} | {heading}, mean | {heading}, min / max |", "|---|---:|---:|"]
    for name, values in accuracies.items():
        lines.append("| " + " | ".join([str(name), *mean_and_range(values)]) + " |")
    return "\n".join(lines) + "\n"


def mean_and_range(values):
    """Accuracies (fractions) as ['mean%', 'min% / max%']."""
    mean, low, high = utils.mean_min_max(values)
    return [f"{mean:.2f}%", f"{low:.2f}% / {high:.2f}%"]


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
    and of the final weights on the un-augmented training images. Test accuracy
    twice: of the single view, the headline, and with flip-TTA (the mean of the
    softmax of each image and of its mirror image).
    """
    split = all_metrics[0]["eval_split"]
    lines = [f"| model | params | train acc (last epoch, augmented) | train acc (final weights) "
             f"| {split} acc | {split} acc, flip-TTA | s/epoch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in all_metrics:
        seconds = sum(m["epoch_seconds"]) / len(m["epoch_seconds"])
        lines.append(f"| {m['norm'].upper()} | {m['params']:,} | {100 * m['train_acc'][-1]:.2f}% "
                     f"| {100 * m['train_eval_acc']:.2f}% | {100 * m['test_acc'][-1]:.2f}% "
                     f"| {100 * m[TTA]:.2f}% | {seconds:.1f} |")
    return "\n".join(lines) + ("\n\nflip-TTA: the softmax of each image and of its mirror "
                               "image, averaged; the single view is the headline.\n")
