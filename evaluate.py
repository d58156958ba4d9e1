"""Evaluate trained models on the CIFAR-10 test images, side by side.

    python evaluate.py results/bn results/ln results/gn

Each argument is a run folder (holding model.pt) or a model file. Prints each model's
test accuracy (and the accuracy its run recorded, where its metrics.json is beside
it), its flip-TTA accuracy (the softmax of each image and of its mirror image,
averaged) and a table of accuracy per class; writes into --images-dir, replacing files
of the same names, each model's confusion matrix (<name>_confusion.png) and Grad-CAM
maps of its misclassified images (<name>_gradcam.png), per_class.png,
misclassified_compared.png (test images the models disagree on, with every model's
prediction and confidence) and gradcam_compared.png (where each model looked there).
"""
import argparse
from pathlib import Path

import cli
import reports
import utils
from models import ModelFileError, load
from utils import UserError


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL",
                        help="run folders holding a model.pt, or model files")
    cli.add_data_options(parser)
    parser.add_argument("--images-dir", type=Path, default=Path("evaluation"),
                        help="where the figures go; figures of the same names there are "
                             "replaced (default: %(default)s)")
    cli.add_device_options(parser, training=False)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="bfloat16 mixed precision (default: as each model's run was "
                             "trained, from the metrics.json beside it; else float32)")
    args = parser.parse_args(argv)
    cli.resolve_device(parser, args)
    return args


def recorded_run(model_path):
    """The metrics.json of the run that made the model file, or {} where there is none."""
    path = (model_path if model_path.is_dir() else model_path.parent) / "metrics.json"
    return reports.read_metrics(path) if path.is_file() else {}


def main(argv=None):
    args = parse_args(argv)
    try:
        models, runs = {}, {}
        for path in args.models:
            try:
                model = load(path)
            except ModelFileError as error:
                raise UserError(error) from None
            name = model.config["norm"].upper()
            name = name if name not in models else f"{name} {path}"
            models[name], runs[name] = model, recorded_run(path)
        cli.check_writable(args.images_dir, "--images-dir")
        data = utils.load_cifar10(args.data_dir, args.cache_dir)
        images, labels = (t.to(args.device) for t in data["test"])
        precisions = {name: run.get("amp", False) if args.amp is None else args.amp
                      for name, run in runs.items()}
        probabilities = reports.predict(models, images, precisions)
        tta = reports.predict(models, images, precisions, flip_tta=True)
        print(f"{data['source']}: {len(labels):,} test images, on {args.device}; flip-TTA: "
              "the mean of the softmax of each image and of its mirror image\n")
        for (name, p), path in zip(probabilities.items(), args.models):
            accuracy = (p.argmax(1) == labels).float().mean().item()
            tta_accuracy = (tta[name].argmax(1) == labels).float().mean().item()
            recorded = runs[name].get("test_acc", [None])[-1] if runs[name].get(
                "eval_split") == "test" else None
            note = f" (its run recorded {100 * recorded:.2f}%)" if recorded is not None else ""
            print(f"{name:<4} {path}: test accuracy {100 * accuracy:.2f}%{note}, flip-TTA "
                  f"{100 * tta_accuracy:.2f}%, {'bfloat16' if precisions[name] else 'float32'}")
        table = reports.compare(models, probabilities, images, labels, args.images_dir)
        print(f"\naccuracy per class:\n\n{table}\nfigures in {args.images_dir}")
    except UserError as error:
        cli.fail(error)


if __name__ == "__main__":
    main()
