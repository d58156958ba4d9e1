import json
import re

import pytest
import torch

import evaluate
import models
import train
import utils
from conftest import ROOT, one_line_error


@pytest.fixture
def finished_runs(run_args, tmp_path):
    """Two variants trained for 2 epochs on the synthetic folder, in tmp_path/out."""
    train.main(run_args("--norm", "bn"))
    train.main(run_args("--norm", "gn"))
    return tmp_path / "out"


def evaluate_args(image_folder, tmp_path, *models):
    return [*map(str, models), "--data-dir", str(image_folder), "--cache-dir",
            str(tmp_path / "cache"), "--images-dir", str(tmp_path / "evaluation"), "--device", "cpu"]


def test_evaluate_reproduces_each_runs_accuracy_and_writes_the_figures(
        finished_runs, image_folder, tmp_path, capsys):
    capsys.readouterr()
    evaluate.main(evaluate_args(image_folder, tmp_path, finished_runs / "bn",
                                finished_runs / "gn" / "model.pt"))
    out = capsys.readouterr().out
    for norm in ("bn", "gn"):
        metrics = json.loads((finished_runs / norm / "metrics.json").read_text())
        recorded, tta = metrics["test_acc"][-1], metrics["test_acc_flip_tta"]
        line = next(line for line in out.splitlines() if line.startswith(norm.upper() + " "))
        assert f"test accuracy {100 * recorded:.2f}% (its run recorded {100 * recorded:.2f}%)" in line
        assert f"flip-TTA {100 * tta:.2f}%" in line  # the run's own record of it, reproduced
    assert re.search(r"\| class \| BN \| GN \|", out)
    for name in ("bn_confusion.png", "gn_confusion.png", "per_class.png", "bn_gradcam.png",
                 "gn_gradcam.png", "misclassified_compared.png", "gradcam_compared.png"):
        assert (tmp_path / "evaluation" / name).stat().st_size > 0


def test_per_class_accuracies_add_up_to_the_overall_accuracy():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    predictions = torch.where(torch.rand(500, generator=generator) < 0.7, labels,
                              torch.randint(0, 10, (500,), generator=generator))
    per_class = utils.per_class_accuracy(labels, predictions)
    counts = torch.bincount(labels, minlength=10)
    correct = sum(a * n for a, n in zip(per_class, counts.tolist()))
    assert correct == pytest.approx((predictions == labels).sum().item())
    assert per_class[3] == pytest.approx(
        ((predictions == labels) & (labels == 3)).sum().item() / counts[3].item())


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "no such file"),
    (lambda path: path.write_text("not a model"), "not a readable model file"),
    (lambda path: torch.save({"conv1.weight": torch.zeros(1)}, path), "does not say which network"),
    (lambda path: torch.save({**models.Net("bn").state_dict(), "conv10.bias": torch.zeros(3)}, path),
     "names or shapes differ"),
])
def test_bad_model_is_one_line_and_exit_code_2(image_folder, tmp_path, capsys, make, message):
    path = tmp_path / "model.pt"
    make(path)
    err = one_line_error(capsys, evaluate_args(image_folder, tmp_path, path), evaluate.main)
    assert message in err


def test_the_readmes_snippet_loads_a_model_and_predicts(finished_runs, image_folder, capsys):
    snippet = (ROOT / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert len(snippet.strip().splitlines()) <= 10
    image = next((image_folder / "test" / "cat").iterdir())
    snippet = snippet.replace('"results/bn"', repr(str(finished_runs / "bn")))
    capsys.readouterr()
    exec(snippet.replace('"cat.png"', repr(str(image))), {})
    name, confidence = capsys.readouterr().out.split()
    assert name in utils.CLASSES and confidence.endswith("%")
