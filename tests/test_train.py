"""train.py: what a run writes and learns, its options, its report and figures."""
import json

import pytest
import torch

import checkpoints
import devices
import models
import optimizers
import recipe
import train
import utils
from conftest import NEEDS_CUDA, assert_same_run


FILES = ["out/bn/metrics.json", "out/bn/model.pt", "out/bn/checkpoint.pt",
         "out/images/bn_curves.png", "out/images/bn_misclassified.png",
         "out/images/bn_confusion.png", "out/images/bn_gradcam.png"]


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


def test_a_seed_above_0_writes_to_its_own_folder(run_args, tmp_path):
    train.main(run_args("--norm", "ln", "--seed", "3", "--epochs", "1"))
    assert json.loads((tmp_path / "out/seed3/ln/metrics.json").read_text())["seed"] == 3
    assert (tmp_path / "out/images/seed3/ln_curves.png").exists()
    assert not (tmp_path / "out/ln").exists()


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


def test_a_run_of_a_single_step_works(run_args, tmp_path):
    train.main(run_args("--norm", "bn", "--epochs", "1", "--batch-size", "128"))
    assert json.loads((tmp_path / "out/bn/metrics.json").read_text())["epochs"] == 1
