"""train.py against a hostile user: crafted and malformed files, shared figure folders,
signals at awkward moments, killed writers and parents (issue 36)."""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import evaluate
import models
import train
import utils
from conftest import ROOT, one_line_error, stop_after_the_first_epoch, write_image_folder


class RunsCode:
    """Pickles as a call of os.system that creates the file `marker`: what a crafted file
    holds to run code when it is loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_with_digest(obj, path):
    """`obj` as save_verified writes it: torch.save's bytes behind their correct sha256,
    which anyone can compute."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    Path(path).write_bytes(utils.DIGEST_HEADER + hashlib.sha256(data).hexdigest().encode()
                           + b"\n" + data)


@pytest.fixture
def stopped_run(run_args, tmp_path, monkeypatch, capsys):
    """A BN run of 2 epochs in tmp_path/out, stopped after its first: its checkpoint."""
    stop_after_the_first_epoch(run_args("--norm", "bn", "--epochs", "2"), monkeypatch)
    capsys.readouterr()
    return checkpoints.load_checkpoint(tmp_path / "out/bn/checkpoint.pt")


# ----------------------------------------------------------------------------
# 1. No file loaded from disk runs code
# ----------------------------------------------------------------------------

def test_a_crafted_checkpoint_with_a_valid_digest_is_refused_and_never_runs(
        run_args, tmp_path, capsys, stopped_run):
    checkpoint = stopped_run
    marker = tmp_path / "code-ran"
    checkpoint["metrics"]["test_acc"] = RunsCode(marker)
    write_with_digest(checkpoint, tmp_path / "out/bn/checkpoint.pt")
    err = one_line_error(capsys, run_args("--norm", "bn", "--epochs", "2", "--resume"))
    assert "holds objects other than tensors" in err
    assert not marker.exists()


def test_a_checkpoint_written_today_resumes_bit_for_bit(run_args, tmp_path):
    """The new format's round trip: every random state comes back (the resume tests in
    test_train.py check whole runs)."""
    generator = torch.Generator().manual_seed(3)
    checkpoints.seed_everything(5)
    saved = checkpoints.rng_states(generator)
    checkpoints.save_checkpoint({"rng": saved}, tmp_path / "c.pt")
    expected = (torch.rand(3), torch.rand(3, generator=generator), __import__("numpy").random.rand(),
                __import__("random").random())
    checkpoints.set_rng_states(utils.load_verified(tmp_path / "c.pt")["rng"], generator)
    again = (torch.rand(3), torch.rand(3, generator=generator), __import__("numpy").random.rand(),
             __import__("random").random())
    assert all(torch.equal(a, b) for a, b in zip(expected[:2], again[:2]))
    assert expected[2:] == again[2:]


def test_a_crafted_model_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    state = models.Net("bn").state_dict()
    state["conv10.bias"] = RunsCode(marker)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(models.ModelFileError, match="not a readable model file"):
        models.load(tmp_path / "model.pt")
    assert not marker.exists()


def test_a_crafted_cache_is_rebuilt_and_never_runs(image_folder, tmp_path, capsys):
    utils.load_cifar10(image_folder, tmp_path / "cache")
    marker = tmp_path / "code-ran"
    for cache_file in (tmp_path / "cache").iterdir():
        write_with_digest({"signature": RunsCode(marker)}, cache_file)
    data = utils.load_cifar10(image_folder, tmp_path / "cache")
    assert "rebuilding it" in capsys.readouterr().out
    assert len(data["train"][1]) == 80 and not marker.exists()


# ----------------------------------------------------------------------------
# 2. Resume checks the data's content, not its path
# ----------------------------------------------------------------------------

def test_resume_refuses_changed_images_of_the_same_count(run_args, image_folder, tmp_path, capsys,
                                                         stopped_run):
    shutil.rmtree(image_folder)
    write_image_folder(image_folder, seed=1)  # other pixels, same counts and names
    err = one_line_error(capsys, run_args("--norm", "bn", "--epochs", "2", "--resume"))
    assert "data_digest=other images" in err


@pytest.mark.parametrize("move", ["copy", "symlink"])
def test_resume_accepts_the_same_images_at_another_path(run_args, image_folder, tmp_path, move,
                                                        stopped_run):
    elsewhere = tmp_path / "elsewhere"
    if move == "copy":
        shutil.copytree(image_folder, elsewhere)
    else:
        elsewhere.symlink_to(image_folder)
    argv = run_args("--norm", "bn", "--epochs", "2", "--resume")
    argv[argv.index("--data-dir") + 1] = str(elsewhere)
    train.main(argv)
    assert len(json.loads((tmp_path / "out/bn/metrics.json").read_text())["test_acc"]) == 2


# ----------------------------------------------------------------------------
# 3. One line for every hostile file
# ----------------------------------------------------------------------------

def test_a_cache_dir_that_is_a_file_is_one_line(run_args, image_folder, tmp_path, capsys):
    (tmp_path / "cache").write_text("")
    assert "cache folder" in one_line_error(capsys, run_args("--norm", "bn"))
    assert "cache folder" in one_line_error(capsys, [
        str(ROOT / "results/bn"), "--data-dir", str(image_folder), "--cache-dir",
        str(tmp_path / "cache"), "--images-dir", str(tmp_path / "evaluation")], evaluate.main)


MALFORMED_CHECKPOINTS = {
    "metrics a list": lambda c: c.update(metrics=[1, 2]),
    "optimizer empty": lambda c: c.update(optimizer={}),
    "rng empty": lambda c: c.update(rng={}),
    "a weight an int": lambda c: c["model"].update({"conv10.bias": 3}),
    "run a list": lambda c: c.update(run=[1]),
    "optimizer state of the wrong shapes": lambda c: c["optimizer"]["param_groups"].pop(),
    "schedule of the wrong kind": lambda c: c["scheduler"].update(last_epoch="x", _step_count=[]),
    "numpy state too short": lambda c: c["rng"]["numpy"].update(keys=torch.zeros(3)),
}


@pytest.mark.parametrize("damage", MALFORMED_CHECKPOINTS)
def test_a_checkpoint_with_a_valid_digest_and_malformed_content_is_one_line(
        run_args, tmp_path, capsys, damage, stopped_run):
    checkpoint = stopped_run
    MALFORMED_CHECKPOINTS[damage](checkpoint)
    checkpoints.save_checkpoint(checkpoint, tmp_path / "out/bn/checkpoint.pt")
    err = one_line_error(capsys, run_args("--norm", "bn", "--epochs", "2", "--resume"))
    assert "checkpoint.pt" in err


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{}", "EMPTY_TEST_ACC", '{"norm": "xx"}'])
def test_metrics_of_the_wrong_shape_are_one_line_for_the_report_and_evaluate(
        run_args, image_folder, tmp_path, capsys, content):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    path = tmp_path / "out/bn/metrics.json"
    if content == "EMPTY_TEST_ACC":
        content = json.dumps(json.loads(path.read_text()) | {"test_acc": []})
    path.write_text(content)
    assert "metrics.json is not the metrics of a finished run" in one_line_error(
        capsys, run_args("--plots-only"))
    assert "metrics.json is not the metrics of a finished run" in one_line_error(capsys, [
        str(tmp_path / "out/bn"), "--data-dir", str(image_folder), "--cache-dir",
        str(tmp_path / "cache"), "--images-dir", str(tmp_path / "evaluation")], evaluate.main)


def test_a_model_file_with_a_non_tensor_entry_is_a_model_file_error(
        run_args, image_folder, tmp_path, capsys):
    state = models.Net("bn").state_dict()
    state["conv10.bias"] = [1.0, 2.0]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(models.ModelFileError, match="not every weight is a tensor"):
        models.load(tmp_path / "model.pt")
    assert "not every weight is a tensor" in one_line_error(capsys, [
        str(tmp_path / "model.pt"), "--data-dir", str(image_folder), "--cache-dir",
        str(tmp_path / "cache"), "--images-dir", str(tmp_path / "evaluation")], evaluate.main)


# ----------------------------------------------------------------------------
# 4. Figures are outputs too
# ----------------------------------------------------------------------------

def test_figures_of_another_out_dir_are_not_replaced_without_overwrite(run_args, tmp_path, capsys):
    figures = ["--images-dir", str(tmp_path / "figures")]
    train.main(run_args("--norm", "bn", "--epochs", "1", *figures, out="a"))
    before = (tmp_path / "figures/comparison.png").read_bytes()
    # Another norm: none of its own figures are there, but the comparison's are.
    err = one_line_error(capsys, run_args("--norm", "ln", "--epochs", "1", *figures, out="b"))
    assert "holds the figures of the runs in" in err
    assert (tmp_path / "figures/comparison.png").read_bytes() == before
    assert not (tmp_path / "b/ln").exists()
    train.main(run_args("--norm", "ln", "--epochs", "1", *figures, "--overwrite", out="b"))
    assert (tmp_path / "figures/comparison.png").read_bytes() != before
    train.main(run_args("--plots-only", *figures, out="b"))  # its own figures: redrawn


def test_a_second_run_into_an_images_dir_in_use_is_refused_at_once(run_args, tmp_path, capsys):
    (tmp_path / "figures").mkdir()
    with checkpoints.FolderLock(tmp_path / "figures", "--images-dir"):
        err = one_line_error(capsys, run_args("--norm", "bn", "--images-dir",
                                              str(tmp_path / "figures"), out="b"))
    assert "another run is writing to" in err and "--images-dir" in err


def test_evaluate_says_in_its_help_what_it_replaces(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert "replaced" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# 5. Interrupts say the truth
# ----------------------------------------------------------------------------

def test_an_interrupted_overwrite_removes_the_old_report_and_prints_a_working_command(
        run_args, tmp_path, monkeypatch, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "2"))
    capsys.readouterr()
    argv = run_args("--norm", "bn", "--epochs", "2", "--overwrite")
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    stop_after_the_first_epoch(argv, monkeypatch)
    err = capsys.readouterr().err
    assert "checkpoint.pt (epoch 1)" in err and "--overwrite" not in err
    for name in ("out/results.md", "out/images/comparison.png", "out/images/per_class.png",
                 "out/images/bn_confusion.png", "out/images/bn_curves.png"):
        assert not (tmp_path / name).exists(), name
    train.main(err.split("resume with: python ")[1].split()[1:])  # the printed command works
    assert len(json.loads((tmp_path / "out/bn/metrics.json").read_text())["test_acc"]) == 2


def start_long_run(run_args, tmp_path, *options, python_options=()):
    command = [sys.executable, *python_options, str(ROOT / "train.py"),
               *run_args("--norm", "bn", *options)]
    command[command.index("--epochs") + 1] = "500"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out/**/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    return process


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM),
                                     (signal.SIGINT, signal.SIGTERM)])
def test_two_stop_signals_exit_130_without_a_traceback(run_args, tmp_path, signals):
    process = start_long_run(run_args, tmp_path)
    for sig in signals:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr and "--resume" in stderr


def test_ctrl_c_during_start_up_is_one_line():
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch takes longer
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip() == "interrupted during start-up: nothing was written"


def test_nan_in_the_first_epoch_names_no_checkpoint(run_args, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(run_args("--norm", "bn", "--lr", "1e30", "--epochs", "1"))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "in epoch 1" in err
    assert "there is no checkpoint" in err and "checkpoint.pt" not in err


# ----------------------------------------------------------------------------
# 6. No leftovers
# ----------------------------------------------------------------------------

def test_temporary_files_of_dead_writers_are_removed_by_the_next_run(run_args, tmp_path):
    (tmp_path / "out/bn").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"out/bn/.checkpoint.pt.{dead}.0123abcd.tmp"
    alive = tmp_path / f"out/bn/.model.pt.{os.getppid()}.0123abcd.tmp"  # a writer still running
    for path in (stale, alive):
        path.write_bytes(b"half a file")
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    assert not stale.exists() and alive.exists()


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_seeds_children_stop_when_their_parent_is_killed(run_args, tmp_path):
    process = start_long_run(run_args, tmp_path, "--seeds", "0", "1", "--threads", "2")
    kids = children(process.pid)
    assert len(kids) == 2
    process.kill()
    process.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{kid}").exists() and "Z" not in Path(f"/proc/{kid}/stat").read_text()
              .split(")")[1][:3] for kid in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{kid}").exists() and "Z" not in Path(f"/proc/{kid}/stat")
                   .read_text().split(")")[1][:3] for kid in kids)


# ----------------------------------------------------------------------------
# 7. Reproducible files
# ----------------------------------------------------------------------------

def test_two_identical_runs_write_model_files_of_the_same_bytes(run_args, tmp_path):
    train.main(run_args("--norm", "bn", "--epochs", "1", out="a"))
    train.main(run_args("--norm", "bn", "--epochs", "1", out="b"))
    digests = {hashlib.sha256((tmp_path / run / "bn/model.pt").read_bytes()).hexdigest()
               for run in ("a", "b")}
    assert len(digests) == 1
