"""study.py: the grid of a study trained with train.py, resumed, reported (issue 37)."""
import json

import pytest

import study
from conftest import one_line_error, stop_after_the_first_epoch


@pytest.fixture
def study_args(image_folder, tmp_path):
    """study.py options for a tiny bn-batch grid on the synthetic folder."""
    def make(*extra):
        return ["bn-batch", "--settings", "4", "16", "--seeds", "0", "1", "--epochs", "2",
                "--batch-size", "16", "--data-dir", str(image_folder), "--cache-dir",
                str(tmp_path / "cache"), "--out-dir", str(tmp_path / "studies"),
                "--default-runs", str(tmp_path / "default"), "--images-dir",
                str(tmp_path / "images"), "--device", "cpu", *extra]
    return make


def test_the_grid_trains_what_is_missing_resumes_what_was_stopped_and_reports(
        study_args, image_folder, tmp_path, capsys, monkeypatch):
    # Setting 4, seed 1: a run stopped after its first epoch (its checkpoint, no metrics).
    stop_after_the_first_epoch(
        ["--norm", "bn", "--bn-batch", "4", "--seed", "1", "--epochs", "2", "--batch-size",
         "16", "--data-dir", str(image_folder), "--cache-dir", str(tmp_path / "cache"),
         "--out-dir", str(tmp_path / "studies/bn-batch/4"), "--device", "cpu"], monkeypatch)
    capsys.readouterr()

    study.main(study_args())
    out = capsys.readouterr().out
    assert "4 run(s) to train" in out  # 2 settings x 2 seeds, the default's in --default-runs
    assert "resuming from epoch 1 of 2" in (tmp_path / "studies/bn-batch/logs/4-seed1.log").read_text()
    for folder in ("studies/bn-batch/4", "studies/bn-batch/4/seed1", "default", "default/seed1"):
        metrics = json.loads((tmp_path / folder / "bn/metrics.json").read_text())
        assert len(metrics["test_acc"]) == 2
        assert metrics["bn_batch"] == (None if folder.startswith("default") else 4)
    table = (tmp_path / "studies/bn-batch/results.md").read_text()
    assert "| 4 | 47,898 | 0, 1 |" in table and "| 16 (default) | 47,898 | 0, 1 |" in table
    assert "BN at test time" in table and "| 4 |" in table.split("BN at test time")[1]
    assert (tmp_path / "images/bn_batch.png").stat().st_size > 0

    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("**/metrics.json")}
    study.main(study_args())  # finished: nothing trains again
    assert "run(s) to train" not in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("**/metrics.json")}


def test_a_run_of_another_recipe_is_refused_in_the_study(study_args, tmp_path, capsys):
    study.main(study_args("--seeds", "0"))
    path = tmp_path / "default/bn/metrics.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"lr": 0.05}))
    err = one_line_error(capsys, study_args("--settings", "4", "16", "--seeds", "0",
                                            "--report-only"), study.main)
    assert "differs from the others in lr" in err


@pytest.mark.parametrize("options, message", [
    (["--settings", "3"], "bn-batch has no setting 3"),
    (["--settings", "32"], "--bn-batch 32 does not divide --batch-size 16; choose --settings that do"),
    (["--jobs", "0"], "must be at least 1"),
    (["--report-only"], "no finished run of bn-batch"),
])
def test_bad_input_is_one_line(study_args, capsys, options, message):
    assert message in one_line_error(capsys, study_args(*options), study.main)


def test_a_failing_run_ends_the_study_with_its_log_named(study_args, tmp_path, capsys):
    (tmp_path / "studies/bn-batch/4").mkdir(parents=True)
    (tmp_path / "studies/bn-batch/4/bn").write_text("a file where the run's folder goes")
    err = one_line_error(capsys, study_args("--settings", "4", "--seeds", "0"), study.main)
    assert "failed (exit code 2)" in err and "4-seed0.log" in err


@pytest.mark.parametrize("amp, option", [(True, "--amp"), (False, "--no-amp")])
def test_every_setting_trains_in_the_precision_of_the_default_runs(study_args, tmp_path, amp,
                                                                   option):
    """The default runs' precision, not the device's default: a GPU trains in float32 by
    default, the committed CPU runs in bfloat16, and the study could not mix them."""
    path = tmp_path / "default/bn/metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"amp": amp, "norm": "bn", "params": 1, "seed": 0, "epochs": 1,
                                "batch_size": 16, "eval_split": "test", "train_eval_acc": 0.5,
                                **{k: [0.5] for k in ("train_loss", "train_acc", "test_loss",
                                                      "test_acc", "epoch_seconds")}}))
    args = study.parse_args(study_args())
    assert option in study.train_command(args, 4, [0])
