"""optimizers.py: Muon's orthogonalized step, the one-cycle schedule."""
import pytest
import torch

import models
import optimizers


@pytest.mark.parametrize("shape", [(64, 9), (9, 64), (96, 96)])
def test_orthogonalize_gives_the_polar_factor_roughly(shape):
    """U V^T of the SVD U S V^T, with S's values anywhere from 0.01 to 1 of the largest:
    all singular values come out near 1 (the quintic iteration stops short of exactly 1)."""
    torch.manual_seed(0)
    rank = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], rank))[0]
    v = torch.linalg.qr(torch.randn(shape[1], rank))[0]
    matrix = 5 * u @ torch.diag(torch.logspace(-2, 0, rank)) @ v.T
    result, = optimizers.orthogonalize([matrix])
    singular_values = torch.linalg.svdvals(result)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    polar = u @ v.T
    assert (result * polar).sum() / (result.norm() * polar.norm()) > 0.98


def test_orthogonalize_in_one_padded_batch_gives_each_matrix_what_it_gets_alone():
    """On CUDA all of a step's matrices go through the iteration as one batch, each
    zero-padded to the largest shape: each must come out as from a batch of its own."""
    torch.manual_seed(0)
    shapes = [(16, 27), (32, 16), (64, 9), (96, 96), (64, 9), (9, 96)]
    matrices = [torch.randn(shape) for shape in shapes]
    together = optimizers.orthogonalize(matrices, one_batch=True)
    for matrix, result in zip(matrices, together):
        alone, = optimizers.orthogonalize([matrix], one_batch=False)
        assert result.shape == matrix.shape
        torch.testing.assert_close(result, alone, rtol=1e-4, atol=1e-5)


def test_make_optimizer_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="sgd, muon"):
        optimizers.make_optimizer(models.Net("bn"), "adam", lr=0.1, momentum=0.9, weight_decay=0.0,
                             muon_lr=0.03)


def test_muon_turns_the_normalized_filters_and_gives_the_rest_sgds_step():
    torch.manual_seed(0)
    model = models.Net("bn", "separable")
    filters = model.normalized_filters()
    assert len(filters) == 16  # C1, C2, c3, c6, and two in each of C3-C5 and C7-C9: not C10
    assert not any(f is model.conv10.weight for f in filters)
    twin = models.Net("bn", "separable")
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for net in (model, twin):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    start = [(f.detach().clone(), f.grad.clone()) for f in filters]
    optimizers.make_optimizer(model, "muon", lr=0.1, momentum=0.9, weight_decay=5e-4, muon_lr=0.03).step()
    optimizers.make_optimizer(twin, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, muon_lr=0.03).step()
    # A filter: scaled to norm sqrt(rows), then moved against its orthogonalized
    # Nesterov momentum, (1 + 0.9) x the gradient in a first step, at lr 0.03.
    for weight, (before, grad) in zip(filters, start):
        rows = len(weight)
        turn = optimizers.orthogonalize([1.9 * grad.reshape(rows, -1)])[0].view_as(grad)
        torch.testing.assert_close(weight, before * rows ** 0.5 / before.norm() - 0.03 * turn)
    # The rest (the norms' weights and biases, C10) took SGD's step.
    rest = [(a, b) for a, b in zip(model.parameters(), twin.parameters())
            if not any(a is f for f in filters)]
    assert len(rest) == len(list(model.parameters())) - 16
    for a, b in rest:
        torch.testing.assert_close(a, b)


def test_one_cycle_rises_to_the_peak_then_falls_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4, momentum=0.9)
    scheduler = optimizers.one_cycle(optimizer, total_steps=8, warmup_fraction=0.25)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.2, 0.4, 0.4 * 5 / 6, 0.4 * 4 / 6, 0.4 * 3 / 6, 0.4 * 2 / 6, 0.4 / 6])
    assert optimizer.param_groups[0]["momentum"] == 0.9  # momentum is left as given
