import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import devices
import models
import optimizers
import recipe
import train
import utils
from conftest import BROKEN_FOLDERS, ROOT

FILES = ["out/bn/metrics.json", "out/bn/model.pt", "out/bn/checkpoint.pt",
         "out/images/bn_curves.png", "out/images/bn_misclassified.png",
         "out/images/bn_confusion.png", "out/images/bn_gradcam.png"]


def read_metrics(path):
    metrics = json.loads(path.read_text())
    metrics.pop("epoch_seconds")  # wall-clock time is the one thing allowed to differ,
    metrics.pop("runs_at_once")  # with how many runs shared the machine meanwhile
    metrics.pop("resumed", None)  # where a resumed run went on
    return metrics


def assert_same_run(run_a, run_b):
    """Two run folders of one variant hold identical metrics and bit-identical weights."""
    assert read_metrics(run_a / "metrics.json") == read_metrics(run_b / "metrics.json")
    a, b = torch.load(run_a / "model.pt"), torch.load(run_b / "model.pt")
    assert a.pop("_extra_state") == b.pop("_extra_state")  # the network's config
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_all_three_variants_write_every_output(run_args, tmp_path, capsys):
    train.main(run_args())
    out = capsys.readouterr().out
    assert "Total params" in out  # the torchsummary table
    for norm in ("bn", "ln", "gn"):
        for name in FILES:
            assert (tmp_path / name.replace("bn", norm)).stat().st_size > 0
        metrics = json.loads((tmp_path / "out" / norm / "metrics.json").read_text())
        assert metrics["norm"] == norm and metrics["epochs"] == 2 and metrics["seed"] == 0
        assert metrics["params"] < 50_000 and metrics["device"] == "cpu" and metrics["processor"]
        assert metrics["label_smoothing"] == 0.1  # the recipe
        momentum = {"bn": 0.9, "ln": 0.95, "gn": 0.95}[norm]  # per norm, see train.MOMENTUM
        activation = {"bn": "ReLU", "ln": "GELU", "gn": "GELU"}[norm]  # and train.ACTIVATION
        assert metrics["activation"] == activation.lower()
        assert f"{activation}-3 " in out.split(f"=== {norm.upper()}:")[1]  # in its summary
        checkpoint = checkpoints.load_checkpoint(tmp_path / "out" / norm / "checkpoint.pt")
        assert metrics["momentum"] == checkpoint["optimizer"]["param_groups"][0]["momentum"] == momentum
        assert metrics["optimizer"] == "muon"  # train.OPTIMIZER
        assert len(checkpoint["optimizer"]["param_groups"]) == 2  # Muon's and SGD's
        muon_lr = {"bn": 0.03, "ln": 0.015, "gn": 0.03}[norm]  # per norm, see train.MUON_LR
        assert metrics["muon_lr"] == checkpoint["optimizer"]["param_groups"][0]["initial_lr"] == muon_lr
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds"):
            assert len(metrics[key]) == 2
        assert metrics["train_size"] == 80 and metrics["test_size"] == 20
        assert f"{norm} epoch  2/2" in out
    for name in ("comparison.png", "per_class.png", "misclassified_compared.png",
                 "bn_confusion.png", "ln_confusion.png", "gn_confusion.png"):
        assert (tmp_path / "out/images" / name).stat().st_size > 0
    table = (tmp_path / "out/results.md").read_text()
    assert all(f"| {norm} |" in table for norm in ("BN", "LN", "GN"))
    assert "| class | BN | LN | GN |" in table and "| truck |" in table  # the per-class table


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("amp, cuda_graph", [(False, False), (True, False),
                                             pytest.param(False, True, marks=NEEDS_CUDA)])
def test_training_learns_an_easy_task(image_folder, tmp_path, amp, cuda_graph):
    """Colour tells the class: a working loop (images aligned with labels) learns it,
    in float32, in bfloat16 mixed precision and replaying CUDA graphs."""
    device = torch.device("cuda" if cuda_graph else "cpu")
    data = utils.load_cifar10(image_folder, tmp_path / "cache")
    images, labels = (t.to(device) for t in data["train"])
    torch.manual_seed(0)
    model = models.Net("bn", "plain").to(device, memory_format=devices.memory_format(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator(device).manual_seed(0)
    step = utils.TrainStep(model, optimizer, images, labels, generator, label_smoothing=0.0,
                           translate=4, cutout=0, amp=amp, cuda_graph=cuda_graph)
    for _ in range(40):  # bfloat16 learns it too, on a bumpier path: 0.6-0.9 at 10-30 epochs
        utils.train([step], [scheduler], 16)
    _, accuracy, _ = utils.test(model, *(t.to(device) for t in data["test"]), amp=amp)
    assert accuracy >= 0.8  # chance is 0.1: mixed-up labels could not get here


def tiny_step(device="cpu", cuda_graph=False, optimizer="sgd"):
    """A TrainStep on 32 random images, its model and its optimizer."""
    torch.manual_seed(0)
    model = models.Net("bn").to(device, memory_format=devices.memory_format(device))
    optimizer = optimizers.make_optimizer(model, optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                     muon_lr=0.03)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (32,), device=device)
    generator = torch.Generator(device).manual_seed(0)
    return utils.TrainStep(model, optimizer, images, labels, generator, label_smoothing=0.0,
                           translate=4, cutout=0, amp=False, cuda_graph=cuda_graph), model, optimizer


@pytest.mark.parametrize("optimizer_name", ["sgd", "muon"])
def test_cuda_graph_step_keeps_the_learning_rate_where_the_scheduler_updates_it(optimizer_name):
    """A graph replays the values it was captured with: the learning rate must be a
    tensor that the scheduler fills in place, and what the optimizer (the fused SGD
    kernel, or Muon) reads from it must be the update it makes with the number."""
    plain, plain_model, _ = tiny_step(optimizer=optimizer_name)
    graphed, graphed_model, optimizer = tiny_step(cuda_graph=True, optimizer=optimizer_name)
    lrs = [group["lr"] for group in optimizer.param_groups]  # built on the CPU here
    assert all(isinstance(lr, torch.Tensor) for lr in lrs) and optimizer.param_groups[0]["fused"]
    scheduler = optimizers.one_cycle(optimizer, total_steps=8, warmup_fraction=0.25)  # up to the peak at step 2, then down
    plain_scheduler = optimizers.one_cycle(plain.optimizer, total_steps=8, warmup_fraction=0.25)
    assert all(lr.item() == 0 for lr in lrs)
    for _ in range(4):
        index = torch.arange(16)
        plain.step(index)  # the computation a graph captures, run eagerly
        graphed.step(index)
        scheduler.step()
        plain_scheduler.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        assert group["lr"] is lr and lr.item() == pytest.approx(group["initial_lr"] * 2 / 3)
    for a, b in zip(plain_model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(a, b)
    assert not torch.equal(next(graphed_model.parameters()), next(tiny_step()[1].parameters()))


@pytest.mark.parametrize("from_graph", [False, True])
def test_train_step_takes_a_checkpoint_of_either_kind_of_run(from_graph):
    _, _, saved = tiny_step(cuda_graph=from_graph)
    state = saved.state_dict()
    for cuda_graph in (False, True):
        step, _, optimizer = tiny_step()
        optimizer.load_state_dict(state)
        utils.TrainStep(step.model, optimizer, step.images, step.labels, step.generator,
                        label_smoothing=0.0, translate=4, cutout=0, amp=False,
                        cuda_graph=cuda_graph)
        group = optimizer.param_groups[0]
        assert isinstance(group["lr"], torch.Tensor) == cuda_graph
        assert float(group["lr"]) == pytest.approx(0.1)
        assert group["fused"] == (cuda_graph or None)


@NEEDS_CUDA
def test_cuda_graph_replays_follow_the_learning_rate():
    """After capture, steps only replay the graph: weights change while the
    learning rate is up, and stay put once the scheduler sets it to 0."""
    step, model, optimizer = tiny_step("cuda", cuda_graph=True)
    captured = utils.TrainStep.WARMUP_STEPS + 1  # the first step that replays a graph
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: float(i < captured))
    index = torch.arange(16, device="cuda")
    weights = []
    for _ in range(captured + 3):
        step(index)
        scheduler.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert len(step.graphs) == 1
    assert not torch.equal(weights[captured - 2], weights[captured - 1])  # the captured step trained
    assert all(torch.equal(w, weights[captured - 1]) for w in weights[captured:])


def test_same_seed_gives_identical_results(run_args, tmp_path):
    train.main(run_args("--norm", "gn", out="a"))
    train.main(run_args("--norm", "gn", out="b"))
    assert_same_run(tmp_path / "a/gn", tmp_path / "b/gn")


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


def test_a_seed_above_0_writes_to_its_own_folder(run_args, tmp_path):
    train.main(run_args("--norm", "ln", "--seed", "3", "--epochs", "1"))
    assert json.loads((tmp_path / "out/seed3/ln/metrics.json").read_text())["seed"] == 3
    assert (tmp_path / "out/images/seed3/ln_curves.png").exists()
    assert not (tmp_path / "out/ln").exists()


def one_line_error(capsys, argv, main=train.main):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


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


@pytest.mark.parametrize("norm, option, value", [("bn", "--bn-batch", "8"),
                                                 ("gn", "--gn-groups", "channel")])
def test_a_norms_own_option_is_recorded_and_rebuilt_and_leaves_the_others_alone(
        run_args, tmp_path, norm, option, value):
    train.main(run_args(option, value, "--epochs", "1"))  # all three norms
    for other in ("bn", "ln", "gn"):
        metrics = json.loads((tmp_path / "out" / other / "metrics.json").read_text())
        key = option[2:].replace("-", "_")
        expected = (int(value) if value.isdigit() else value) if other == norm else None
        assert metrics[key] == expected
        assert models.load(tmp_path / "out" / other).config.get(key) == expected


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


def test_optimizer_defaults_to_muon_and_the_option_overrides_it():
    runs = [recipe.run_options(norm, train.parse_args([])) for norm in ("bn", "ln", "gn")]
    # Per norm, see train.MUON_LR.
    assert [(run["optimizer"], run["muon_lr"]) for run in runs] == [("muon", 0.03), ("muon", 0.015),
                                                                     ("muon", 0.03)]
    args = train.parse_args(["--muon-lr", "0.05"])
    assert [recipe.run_options(norm, args)["muon_lr"] for norm in ("bn", "ln", "gn")] == [0.05] * 3
    args = train.parse_args(["--optimizer", "sgd", "--muon-lr", "0.05"])
    runs = [recipe.run_options(norm, args) for norm in ("bn", "ln", "gn")]
    # No Muon lr where no Muon.
    assert [(run["optimizer"], run["muon_lr"]) for run in runs] == [("sgd", None)] * 3


def test_momentum_option_overrides_every_norms_default():
    args = train.parse_args(["--momentum", "0.8"])
    assert [recipe.run_options(norm, args)["momentum"] for norm in ("bn", "ln", "gn")] == [0.8] * 3


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_activation_option_overrides_every_norms_default(activation):
    args = train.parse_args(["--activation", activation])
    assert [recipe.run_options(norm, args)["activation"] for norm in ("bn", "ln", "gn")] == [activation] * 3


def test_checkpoint_of_the_other_precision_is_refused(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--no-amp"))
    metrics = tmp_path / "out/bn/metrics.json"
    assert json.loads(metrics.read_text())["amp"] is False
    os.remove(metrics)
    err = one_line_error(capsys, [*run_args("--norm", "bn", "--amp"), "--resume"])
    assert "amp=False" in err


def test_cli_rejects_unknown_norm_without_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--norm", "xyz"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'xyz'" in result.stderr


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_evaluation_gives_the_same_results_in_any_batch_size(norm):
    """The eval batch size is a speed setting only (devices.eval_batch_size)."""
    torch.manual_seed(0)
    model = models.Net(norm, "separable").to(memory_format=devices.memory_format("cpu"))
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    loss, accuracy, predictions = utils.test(model, images, labels, batch_size=40)
    # Batches of 7 (the last one of 5): BN must use its running statistics, not the batch's.
    other_loss, other_accuracy, other_predictions = utils.test(model, images, labels, batch_size=7)
    assert torch.equal(predictions, other_predictions) and other_accuracy == accuracy
    assert other_loss == pytest.approx(loss, rel=1e-5)


def test_val_split_evaluates_on_held_out_training_images(run_args, tmp_path):
    train.main(run_args("--norm", "bn", "--val-split", "30"))
    metrics = json.loads((tmp_path / "out/bn/metrics.json").read_text())
    assert metrics["eval_split"] == "validation"
    assert metrics["train_size"] == 50 and metrics["test_size"] == 30
    assert "| validation acc |" in (tmp_path / "out/results.md").read_text()


def test_val_split_holds_out_the_same_images_whatever_the_seed(image_folder, tmp_path):
    data = utils.load_cifar10(image_folder, tmp_path / "cache")
    torch.manual_seed(1)
    a = utils.hold_out(data, 30)
    torch.manual_seed(2)
    b = utils.hold_out(data, 30)
    assert torch.equal(a["test"][0], b["test"][0])
    assert len(a["train"][1]) + len(a["test"][1]) == len(data["train"][1])
    # No held-out image is also a training image.
    train_set = {bytes(x.numpy()) for x in a["train"][0]}
    assert not any(bytes(x.numpy()) in train_set for x in a["test"][0])


@pytest.mark.parametrize("activation, module", [("relu", torch.nn.ReLU), ("gelu", torch.nn.GELU)])
def test_plots_only_redraws_figures_without_training(activation, module, run_args, tmp_path,
                                                     capsys, monkeypatch):
    train.main(run_args("--norm", "gn", "--blocks", "plain", "--activation", activation))
    metrics_file = tmp_path / "out/gn/metrics.json"
    metrics_before = metrics_file.read_text()
    figures = ["gn_curves.png", "gn_misclassified.png", "gn_confusion.png", "gn_gradcam.png",
               "comparison.png", "per_class.png", "misclassified_compared.png",
               "gradcam_compared.png"]
    for name in figures:
        (tmp_path / "out/images" / name).unlink()
    capsys.readouterr()
    loaded = []

    def load_spy(*args, **kwargs):
        loaded.append(models.load(*args, **kwargs))
        return loaded[-1]
    monkeypatch.setattr(train, "load", load_spy)
    train.main(run_args("--norm", "gn", "--plots-only"))
    assert "gn epoch" not in capsys.readouterr().out
    # The run's own blocks and activation, from its model file, not the defaults.
    (model,) = loaded
    assert model.conv3[0].groups == 1 and isinstance(model.conv3[-1], module)
    for name in figures:
        assert (tmp_path / "out/images" / name).stat().st_size > 0
    assert metrics_file.read_text() == metrics_before


def test_the_report_adds_the_flip_tta_accuracy_to_a_run_from_before_it_was_recorded(
        run_args, tmp_path, capsys):
    train.main(run_args("--norm", "ln"))
    path = tmp_path / "out/ln/metrics.json"
    metrics = json.loads(path.read_text())
    recorded = metrics.pop("test_acc_flip_tta")  # as train.py wrote it at the run's end
    path.write_text(json.dumps(metrics))
    train.main(run_args("--plots-only"))
    assert json.loads(path.read_text())["test_acc_flip_tta"] == recorded
    assert f"| {100 * recorded:.2f}% |" in (tmp_path / "out/results.md").read_text()


def test_plots_only_without_a_finished_run_is_one_line(run_args, capsys):
    assert "no finished run" in one_line_error(capsys, [*run_args(), "--plots-only"])


def test_a_run_of_a_single_step_works(run_args, tmp_path):
    train.main(run_args("--norm", "bn", "--epochs", "1", "--batch-size", "128"))
    assert json.loads((tmp_path / "out/bn/metrics.json").read_text())["epochs"] == 1


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


def test_norm_all_checks_every_variants_outputs_before_training_any(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "gn", "--epochs", "1"))
    capsys.readouterr()
    err = one_line_error(capsys, run_args())
    assert "gn" in err and "earlier run" in err
    assert not (tmp_path / "out/bn").exists()


def test_resume_with_other_data_is_refused(run_args, tmp_path, capsys):
    from conftest import write_image_folder
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


def test_plots_only_with_a_missing_model_is_one_line(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--epochs", "1"))
    (tmp_path / "out/bn/model.pt").unlink()
    assert "model.pt: no such file" in one_line_error(capsys, run_args("--plots-only"))


def test_seeds_train_every_pair_side_by_side_as_each_would_train_alone(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "bn", "--seeds", "0", "1", "--epochs", "1"))
    out = capsys.readouterr().out
    if torch.get_num_threads() > 1:
        assert "2 at a time side by side, one thread each" in out
    # Each run where --seed would put it, the same training as that run alone on one thread.
    for seed, folder in ((0, "out"), (1, "out/seed1")):
        train.main(run_args("--norm", "bn", "--seed", str(seed), "--epochs", "1", "--threads", "1",
                            out=f"alone{seed}"))
        assert_same_run(tmp_path / folder / "bn", tmp_path / f"alone{seed}" / "bn" if seed == 0
                        else tmp_path / f"alone{seed}" / "seed1" / "bn")
    table = (tmp_path / "out/seeds.md").read_text()
    assert "| BN | 47,898 | 0, 1 |" in table
    assert (tmp_path / "out/images/seeds.png").stat().st_size > 0
    assert (tmp_path / "out/results.md").exists() and (tmp_path / "out/seed1/results.md").exists()


def test_seeds_check_every_runs_outputs_before_training_any(run_args, tmp_path, capsys):
    train.main(run_args("--norm", "gn", "--seed", "2", "--epochs", "1"))
    err = one_line_error(capsys, run_args("--norm", "gn", "--seeds", "0", "2", "--epochs", "1"))
    assert "seed2" in err and "earlier run" in err
    assert not (tmp_path / "out/gn").exists()


def test_a_failing_run_among_the_seeds_ends_the_command_with_its_exit_code(run_args, monkeypatch,
                                                                           capsys):
    real_forward = models.Net.forward

    def nan_when_training(self, x):
        output = real_forward(self, x)
        return output * float("nan") if self.training else output
    monkeypatch.setattr(models.Net, "forward", nan_when_training)  # forked runs inherit it
    with pytest.raises(SystemExit) as stop:
        train.main(run_args("--norm", "bn", "--seeds", "0", "1", "--epochs", "1"))
    assert stop.value.code == 1
    assert "the run of bn, seed" in capsys.readouterr().err


def train_together(run_args, norms, seeds, *options, out="out"):
    """train.train_together, as train.py calls it on a GPU for --seeds or --norm all,
    on the CPU, for these norms and seeds; returns the Trainings."""
    args = train.parse_args(run_args("--seeds", *map(str, seeds), *options, out=out))
    data = train.on_device(utils.load_cifar10(args.data_dir, args.cache_dir), args.device)
    runs = [train.Training(norm, train.seed_args(args, seed), data, summary=False)
            for seed in seeds for norm in norms]
    train.train_together(runs, data)
    return runs


def test_runs_trained_together_are_each_the_training_it_would_be_alone(run_args, tmp_path):
    """Runs trained at the same time take their batches in turn: each draws its data order
    and augmentation from its own generator, and its weights from its own seed, so each
    is exactly the run trained alone (on a GPU, within cuDNN's nondeterminism)."""
    runs = train_together(run_args, ["bn", "gn"], [0, 1])
    assert [run.metrics["runs_at_once"] for run in runs] == [4] * 4
    for seed in (0, 1):
        for norm in ("bn", "gn"):
            train.main(run_args("--norm", norm, "--seed", str(seed), out="alone"))
        folder = "" if seed == 0 else f"seed{seed}"
        for norm in ("bn", "gn"):
            assert_same_run(tmp_path / "out" / folder / norm, tmp_path / "alone" / folder / norm)


@NEEDS_CUDA
def test_runs_trained_together_on_a_gpu_follow_each_run_alone(run_args, tmp_path):
    """On CUDA the runs replay their CUDA graphs on streams of their own, at the same time:
    each run's losses still follow its run alone (cuDNN may choose other algorithms)."""
    runs = train_together(run_args, ["bn", "ln"], [0, 1], "--device", "cuda")
    for run in runs:
        train.main(run_args("--norm", run.norm, "--seed", str(run.args.seed), "--device", "cuda",
                            out="alone"))
        folder = tmp_path / "alone" / ("" if run.args.seed == 0 else f"seed{run.args.seed}")
        alone = json.loads((folder / run.norm / "metrics.json").read_text())
        assert run.metrics["cuda_graph"] and alone["cuda_graph"]
        for key in ("train_loss", "test_loss"):
            assert run.metrics[key] == pytest.approx(alone[key], rel=1e-3)


def test_runs_trained_together_resume_each_from_its_own_epoch(run_args, tmp_path, monkeypatch):
    real_train = utils.train

    def stop_in_epoch_two(steps, *a, **k):
        if len(steps[0].optimizer.state_dict()["state"]):  # it has taken steps before
            raise KeyboardInterrupt
        return real_train(steps, *a, **k)
    monkeypatch.setattr(utils, "train", stop_in_epoch_two)
    with pytest.raises(SystemExit):
        train.main(run_args("--norm", "ln", "--seed", "1"))
    monkeypatch.undo()
    # seed 1 has 1 epoch of 2 done; seed 0 none.
    runs = train_together(run_args, ["ln"], [0, 1], "--resume")
    assert [run.metrics.get("resumed") is not None for run in runs] == [False, True]
    for seed in (0, 1):
        train.main(run_args("--norm", "ln", "--seed", str(seed), out="alone"))
    assert_same_run(tmp_path / "out/ln", tmp_path / "alone/ln")
    assert_same_run(tmp_path / "out/seed1/ln", tmp_path / "alone/seed1/ln")


def test_a_run_trained_together_whose_loss_is_nan_stops_after_the_others_saved_the_epoch(
        run_args, tmp_path, monkeypatch):
    real_forward, nan_models = models.Net.forward, []

    def nan_for_the_first_model(self, x):
        nan_models[:] = nan_models or [self]
        output = real_forward(self, x)
        return output * float("nan") if self.training and self is nan_models[0] else output
    monkeypatch.setattr(models.Net, "forward", nan_for_the_first_model)
    with pytest.raises(utils.NonFiniteLoss, match="bn: the loss became NaN or infinite in epoch 1"):
        train_together(run_args, ["bn", "gn"], [0])
    assert not (tmp_path / "out/bn/checkpoint.pt").exists()
    checkpoint = checkpoints.load_checkpoint(tmp_path / "out/gn/checkpoint.pt")
    assert len(checkpoint["metrics"]["train_loss"]) == 1
