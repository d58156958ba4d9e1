"""train.py's runs stopped, killed and resumed; its files written whole or not at all."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoints
import cli
import devices
import models
import recipe
import train
import utils
from conftest import ROOT, assert_same_run, one_line_error, write_image_folder


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_after_a_stop_ends_bit_identical(run_args, tmp_path, monkeypatch, stop_after):
    args = ["--norm", "bn", "--epochs", "3"]
    train.main(run_args(*args, out="whole"))

    real_train, calls = utils.train, []

    def stopped_after_some_epochs(*a, **k):
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # as a kill would: the checkpoint of that epoch is on disk
        calls.append(1)
        return real_train(*a, **k)
    monkeypatch.setattr(utils, "train", stopped_after_some_epochs)
    with pytest.raises(SystemExit) as stop:
        train.main(run_args(*args, out="parts"))
    assert stop.value.code == 130
    assert not (tmp_path / "parts/bn/metrics.json").exists()
    monkeypatch.undo()

    monkeypatch.setattr(devices, "processor_name", lambda device: "another CPU")
    train.main(run_args(*args, "--resume", out="parts"))
    assert_same_run(tmp_path / "parts/bn", tmp_path / "whole/bn")
    metrics = json.loads((tmp_path / "parts/bn/metrics.json").read_text())
    # The record keeps where the run started and says where it went on.
    assert metrics["processor"] != "another CPU"
    assert [(r["epoch"], r["processor"]) for r in metrics["resumed"]] == [(stop_after + 1, "another CPU")]
    assert "resumed" not in json.loads((tmp_path / "whole/bn/metrics.json").read_text())


def test_sigterm_keeps_the_checkpoint_and_says_how_to_resume(run_args, tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *run_args("--norm", "bn")]
    command[command.index("--epochs") + 1] = "500"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "out/bn/checkpoint.pt"
    deadline = time.time() + 60
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    assert checkpoints.load_checkpoint(checkpoint)["metrics"]["train_loss"]


def disk_full(self, *args, **kwargs):
    """A write that gets half way, then finds the disk full."""
    open(self, "wb").write(b"half a fi")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_checkpoint_is_replaced_atomically_and_a_full_disk_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(utils.UserError, match="could not write .*checkpoint.pt .No space left"):
        checkpoints.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert utils.load_verified(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_full_disk_during_a_run_is_one_line_and_leaves_no_temporary_file(run_args, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", disk_full)  # the checkpoint's write
    err = one_line_error(capsys, run_args("--norm", "bn"))
    assert "No space left on device" in err
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_run_goes_on(image_folder, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    data = utils.load_cifar10(image_folder, tmp_path / "cache")
    assert len(data["train"][1]) == 80
    assert "warning: the data cache was not saved" in capsys.readouterr().out
    assert not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("target", ["checkpoint", "cache"])
def test_flipped_bytes_in_a_checkpoint_or_the_cache_are_noticed(run_args, image_folder, tmp_path,
                                                                capsys, target):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    path = (tmp_path / "out/bn/checkpoint.pt" if target == "checkpoint"
            else next((tmp_path / "cache").glob("train-*.pt")))
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 400):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    if target == "checkpoint":
        err = one_line_error(capsys, run_args("--norm", "bn", "--epochs", "1", "--resume"))
        assert "does not match its digest" in err
    else:
        utils.load_cifar10(image_folder, tmp_path / "cache")
        assert "does not match its digest" in capsys.readouterr().out


def test_metrics_file_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    utils.atomic_write_text('{"epochs": 1}', path)

    def crash_mid_write(self, text):
        open(self, "w").write(text[:3])
        raise OSError("disk full")
    monkeypatch.setattr(Path, "write_text", crash_mid_write)
    with pytest.raises(utils.UserError):
        utils.atomic_write_text('{"epochs": 2}', path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"epochs": 1}


def test_figure_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "bn_curves.png"
    metrics = {"train_loss": [1.0], "test_loss": [0.9], "train_acc": [0.5], "test_acc": [0.6],
               "eval_split": "test", "norm": "bn", "params": 1000}
    utils.plot_curves(metrics, path)
    first = path.read_bytes()

    def crash_mid_write(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError("disk full")
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", crash_mid_write)
    with pytest.raises(utils.UserError):
        utils.plot_curves({**metrics, "train_loss": [2.0]}, path)
    monkeypatch.undo()
    assert path.read_bytes() == first and first.startswith(b"\x89PNG\r\n")


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_last_checkpoint(run_args, tmp_path,
                                                                          monkeypatch, capsys):
    real_forward = models.Net.forward
    batches = []

    def nan_in_last_batch_of_epoch_two(self, x):
        out = real_forward(self, x)
        if self.training:
            batches.append(1)
            if len(batches) == 3 + 3:  # 80 images / 32 = 3 batches an epoch
                out = out * float("nan")
        return out
    monkeypatch.setattr(models.Net, "forward", nan_in_last_batch_of_epoch_two)
    with pytest.raises(SystemExit) as stop:
        train.main(run_args("--norm", "bn", "--epochs", "3"))
    assert stop.value.code == 1
    message = capsys.readouterr().err
    assert "NaN or infinite in epoch 2, batch 3 of 3" in message
    checkpoint = checkpoints.load_checkpoint(tmp_path / "out/bn/checkpoint.pt")
    assert len(checkpoint["metrics"]["train_loss"]) == 1


def test_finished_run_is_never_overwritten_silently(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "ln"))
    before = (tmp_path / "out/ln/metrics.json").read_text()
    with pytest.raises(SystemExit) as stop:
        train.main(run_args("--norm", "ln", "--lr", "0.05"))
    assert stop.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out/ln/metrics.json").read_text() == before
    train.main(run_args("--norm", "ln", "--lr", "0.05", "--overwrite"))
    assert json.loads((tmp_path / "out/ln/metrics.json").read_text())["lr"] == 0.05


def test_corrupt_checkpoint_is_one_line(run_args, tmp_path, capsys):
    (tmp_path / "out/bn").mkdir(parents=True)
    (tmp_path / "out/bn/checkpoint.pt").write_bytes(b"garbage")
    err = one_line_error(capsys, [*run_args("--norm", "bn"), "--resume"])
    assert "not a readable checkpoint" in err


def test_checkpoint_of_another_norm_is_refused_before_loading(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn"))
    (tmp_path / "out/ln").mkdir()
    (tmp_path / "out/bn/checkpoint.pt").rename(tmp_path / "out/ln/checkpoint.pt")
    err = one_line_error(capsys, [*run_args("--norm", "ln"), "--resume"])
    assert "norm='bn'" in err
    assert not (tmp_path / "out/ln/metrics.json").exists()


def test_checkpoint_with_other_options_is_refused(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn"))
    os.remove(tmp_path / "out/bn/metrics.json")
    err = one_line_error(capsys, [*run_args("--norm", "bn", "--lr", "0.01"), "--resume"])
    assert f"lr={recipe.LR}" in err  # names the option that differs, with the checkpoint's value


def test_checkpoint_of_the_other_precision_is_refused(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--no-amp"))
    metrics = tmp_path / "out/bn/metrics.json"
    assert json.loads(metrics.read_text())["amp"] is False
    os.remove(metrics)
    err = one_line_error(capsys, [*run_args("--norm", "bn", "--amp"), "--resume"])
    assert "amp=False" in err


def test_resume_after_sigkill_ends_bit_identical(run_args, tmp_path):
    args = ["--norm", "gn", "--epochs", "4"]
    train.main(run_args(*args, out="whole"))

    command = [sys.executable, str(ROOT / "train.py"), *run_args(*args, out="killed")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed/gn/checkpoint.pt"
    deadline = time.time() + 60
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs, wherever it is
    process.wait(timeout=30)

    train.main(run_args(*args, "--resume", out="killed"))
    assert_same_run(tmp_path / "killed/gn", tmp_path / "whole/gn")


def test_a_second_run_into_the_same_out_dir_is_refused_at_once(run_args, tmp_path):
    first = [sys.executable, str(ROOT / "train.py"), *run_args("--norm", "bn")]
    first[first.index("--epochs") + 1] = "500"
    process = subprocess.Popen(first, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out/bn/checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run([sys.executable, str(ROOT / "train.py"),
                                 *run_args("--norm", "bn", "--lr", "0.05")],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another run is writing to" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        process.kill()
        process.wait()
    with checkpoints.FolderLock(tmp_path / "out"):
        pass  # a killed run holds no lock


def test_resume_with_other_data_is_refused(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    (tmp_path / "out/bn/metrics.json").unlink()  # as if stopped after the epoch
    other = write_image_folder(tmp_path / "other", train_per_class=4)
    argv = run_args("--norm", "bn", "--epochs", "1", "--resume")
    argv[argv.index("--data-dir") + 1] = str(other)
    err = one_line_error(capsys, argv)
    assert "data_digest=other images" in err and "train_size" in err


def test_resume_of_a_finished_run_records_no_resumption(run_args, tmp_path):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    train.main(run_args("--norm", "bn", "--epochs", "1", "--resume"))
    assert "resumed" not in json.loads((tmp_path / "out/bn/metrics.json").read_text())


def test_sigterm_while_images_are_decoded_ends_the_process_promptly(run_args, tmp_path):
    """Decoding takes 0.2 s an image here (100 images, a few threads): a stop that
    waited for the queued images would take seconds."""
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "import train, utils\n"
              "decode = utils._decode_image\n"
              "def slow(path):\n"
              "    print('decoding', flush=True); time.sleep(0.2); return decode(path)\n"
              "utils._decode_image = slow\n"
              f"train.main({run_args('--norm', 'bn')!r})\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines = iter(process.stdout.readline, "")
    assert "decoding\n" in lines, process.communicate()  # reads up to the first decode
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert time.perf_counter() - start < 2


def test_a_second_stop_signal_is_ignored_while_the_first_stops_the_run():
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.stop(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == cli.ignore
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_overwrite_removes_the_old_outputs_before_training(run_args, tmp_path, monkeypatch, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "1"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(utils, "train", interrupted)
    with pytest.raises(SystemExit):
        train.main(run_args("--norm", "bn", "--epochs", "1", "--overwrite"))
    assert not (tmp_path / "out/bn/metrics.json").exists()
    assert not (tmp_path / "out/bn/model.pt").exists()
    assert "no epoch had finished, so no checkpoint was written" in capsys.readouterr().err
