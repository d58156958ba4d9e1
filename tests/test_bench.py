"""bench.py: the speed benchmark runs every pipeline and refuses bad input in one line."""
import re
import subprocess
import sys

import pytest

import bench
import recipe
from conftest import NEEDS_CUDA, ROOT, one_line_error


@pytest.mark.parametrize("options", [[], pytest.param(["--optimizer", "sgd"], id="sgd"),
                                     pytest.param(["--device", "cuda", "--cuda-graph"],
                                                  marks=NEEDS_CUDA, id="cuda_graph")])
def test_bench_smoke_prints_every_pipeline_and_the_ratios(options):
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--synthetic", "64",
                             "--batch-size", "16", "--batches", "2", "--rounds", "1", "--workers", "0",
                             "--norm", "ln", "--eval-batch-sizes", "8", "5", "--at-once", "2",
                             *options],
                            capture_output=True, text=True,
                            timeout=600)  # a guard against a hang, roomy for a busy machine
    assert result.returncode == 0, result.stderr
    graphed = "--cuda-graph" in options  # then the project's step eagerly too, like the limit
    for row in ("| ln | project |", "| ln | limit |", "| ln | dataloader-0 |", "| ln | eval-8 |",
                "| ln | eval-5 |", "| ln | at-once-2 |", "project/at-once-2 **",
                "time project-eager/limit" if graphed else "time project/limit",
                "dataloader-0/project"):
        assert row in result.stdout
    optimizer = "sgd" if "sgd" in options else "muon"  # the default: train.OPTIMIZER
    summary = re.search(r"dataloader-0/project \*\*[0-9.]+\*\* "
                        rf"\(at most dataloader-0/limit \*\*([0-9.]+)\*\*\), \w+, {optimizer} \|",
                        result.stdout)
    assert summary
    # The ceiling is the limit's speed over the DataLoader's (rows rounded to whole images/s).
    speed = {name: float(re.search(rf"\| ln \| {name} \| ([0-9,]+) \|", result.stdout)
                         .group(1).replace(",", "")) for name in ("limit", "dataloader-0")}
    assert float(summary.group(1)) == pytest.approx(speed["limit"] / speed["dataloader-0"],
                                                    rel=0.01, abs=0.01)


def test_bench_bn_batches_times_a_step_of_each_ghost_batch(monkeypatch, capsys):
    built = []  # the statistics batch of every model bench.py builds
    make_model = recipe.make_model
    monkeypatch.setattr(recipe, "make_model",
                        lambda run: built.append(run["bn_batch"]) or make_model(run))
    bench.main(["--synthetic", "64", "--batch-size", "16", "--batches", "2", "--rounds", "1",
                "--workers", "0", "--norm", "bn", "--eval-batch-sizes", "8", "--at-once", "1",
                "--bn-batches", "4", "8"])
    out = capsys.readouterr().out
    assert "| bn | bn-batch-4 |" in out and "| bn | bn-batch-8 |" in out
    assert set(built) == {None, 4, 8}  # plain BN for the other rows, one model per B


@pytest.mark.parametrize("options, message", [
    (["--batches", "0"], "--batches: must be at least 1"),
    (["--workers", "-1"], "--workers: must be at least 0"),
    (["--compile", "--cuda-graph"], "cannot be combined"),
    (["--synthetic", "40"], "need 48 training images, and there are 40"),  # 3 warm-up batches of 16
    (["--data-dir", "no-such-folder"], "no CIFAR-10 data in no-such-folder"),
    (["--norm", "ln", "--bn-batches", "4"], "use it with --norm bn and without --bn-batch"),
    (["--norm", "bn", "--bn-batch", "8", "--bn-batches", "4"], "without --bn-batch"),
    (["--norm", "bn", "--bn-batches", "5"], "--bn-batches 5 does not divide --batch-size 16"),
])
def test_bench_bad_input_is_one_line(tmp_path, capsys, options, message):
    argv = ["--batch-size", "16", "--batches", "2", "--cache-dir", str(tmp_path), *options]
    assert message in one_line_error(capsys, argv, main=bench.main)
