"""train.py's runs side by side (--seeds) and in one process (--norm all, a GPU's runs together)."""
import json

import pytest
import torch

import checkpoints
import models
import train
import utils
from conftest import NEEDS_CUDA, assert_same_run, one_line_error


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
