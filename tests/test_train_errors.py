"""train.py's answer to bad input: one line, no traceback, exit code 2, nothing trained."""
import re
import subprocess
import sys

import pytest
import torch

import train
from conftest import BROKEN_FOLDERS, ROOT, one_line_error


@pytest.mark.parametrize("option, value, message", [
    ("--norm", "xyz", "invalid choice: 'xyz'"),
    ("--epochs", "0", "must be at least 1"),
    ("--epochs", "-3", "must be at least 1"),
    ("--epochs", "ten", "not a whole number"),
    ("--batch-size", "0", "must be at least 1"),
    ("--batch-size", "-8", "must be at least 1"),
    ("--lr", "-0.1", "must be above 0"),
    ("--lr", "0", "must be above 0"),
    ("--lr", "nan", "must be a finite number"),
    ("--muon-lr", "0", "must be above 0"),
    ("--optimizer", "adam", "invalid choice: 'adam'"),
    ("--device", "gpu7", "not a device"),
    ("--seed", "-1", "must be at least 0"),
    ("--seed", str(2**70), "at most 4294967295"),
    ("--label-smoothing", "2", "below 1.0"),
    ("--momentum", "5", "below 1.0"),
    ("--bn-batch", "0", "must be at least 1"),
    ("--bn-batch", "5", "--bn-batch 5 does not divide --batch-size 32"),
    ("--gn-groups", "3", "must divide every width"),
    ("--gn-groups", "layer", "not a whole number"),
])
def test_bad_option_is_one_line_and_exit_code_2(run_args, capsys, option, value, message):
    assert message in one_line_error(capsys, [*run_args(), option, value])


@pytest.mark.parametrize("options, message", [
    (["--norm", "ln", "--bn-batch", "8"], "--bn-batch is BN's option, and LN has none"),
    (["--norm", "bn", "--gn-groups", "8"], "--gn-groups is GN's option, and BN has none"),
])
def test_a_norms_own_option_for_another_norm_is_one_line(run_args, capsys, options, message):
    assert message in one_line_error(capsys, [*run_args(), *options])


@pytest.mark.parametrize("options, message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["--cuda-graph", "--compile"], "--cuda-graph and --compile cannot be combined"),
])
def test_cuda_graph_needs_cuda_and_no_compile(run_args, capsys, options, message):
    assert message in one_line_error(capsys, [*run_args(), *options])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(run_args, capsys):
    assert "CUDA is not available" in one_line_error(capsys, [*run_args(), "--device", "cuda"])


def test_missing_data_dir_without_network_is_one_line(run_args, tmp_path, capsys, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(CIFAR10, "download", offline)
    err = one_line_error(capsys, [*run_args(), "--data-dir", str(tmp_path / "missing")])
    assert "download failed" in err and "--data-dir" in err


@pytest.mark.parametrize("broken", BROKEN_FOLDERS)
def test_bad_image_folder_is_one_line(run_args, image_folder, capsys, broken):
    change, message = BROKEN_FOLDERS[broken]
    change(image_folder)
    assert re.search(message, one_line_error(capsys, run_args()))


def test_unwritable_out_dir_is_one_line(run_args, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    err = one_line_error(capsys, [*run_args(), "--out-dir", str(tmp_path / "a-file" / "out")])
    assert "cannot write to" in err


def test_cli_rejects_unknown_norm_without_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--norm", "xyz"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'xyz'" in result.stderr


def test_plots_only_without_a_finished_run_is_one_line(run_args, capsys):
    assert "no finished run" in one_line_error(capsys, [*run_args(), "--plots-only"])


def test_norm_all_checks_every_variants_outputs_before_training_any(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "gn", "--epochs", "1"))
    capsys.readouterr()
    err = one_line_error(capsys, run_args())
    assert "gn" in err and "earlier run" in err
    assert not (tmp_path / "out/bn").exists()


def test_a_class_of_only_unreadable_files_is_one_line(run_args, image_folder, capsys):
    for path in (image_folder / "train" / "cat").iterdir():
        path.write_text("not an image")
    assert "no readable images of class(es) cat" in one_line_error(capsys, run_args())


def test_plots_only_with_a_corrupt_metrics_file_is_one_line(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    (tmp_path / "out/bn/metrics.json").write_text("{not json")
    assert "not readable JSON" in one_line_error(capsys, run_args("--plots-only"))


def test_a_file_where_a_run_folder_goes_is_one_line(run_args, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/bn").write_text("")
    assert "is a file" in one_line_error(capsys, run_args("--norm", "bn"))


def test_plots_only_with_a_missing_model_is_one_line(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    (tmp_path / "out/bn/model.pt").unlink()
    assert "model.pt: no such file" in one_line_error(capsys, run_args("--plots-only"))
