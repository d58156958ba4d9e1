import pytest
import torch
import torch.nn as nn

from models import GN_GROUPS, NORMS, Net, count_parameters


@pytest.mark.parametrize("norm", NORMS)
def test_under_parameter_budget(norm):
    assert 40_000 < count_parameters(Net(norm)) < 50_000


@pytest.mark.parametrize("norm", NORMS)
def test_outputs_ten_logits_per_image(norm):
    assert Net(norm)(torch.randn(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("norm, groups", [("ln", 1), ("gn", GN_GROUPS)])
def test_layer_and_group_norm_use_groupnorm_and_no_batchnorm(norm, groups):
    modules = list(Net(norm).modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    group_norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 8  # one per 3x3 conv block
    assert all(m.num_groups == groups for m in group_norms)


def test_batch_norm_variant_uses_batchnorm_only():
    modules = list(Net("bn").modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) == 8
    assert not any(isinstance(m, nn.GroupNorm) for m in modules)


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match="bn, ln, gn"):
        Net("xyz")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("source, branch, target", [("conv3", "conv5", "trans6"),
                                                    ("conv7", "conv9", "gap")])
def test_skip_connection_adds_source_to_branch(norm, source, branch, target):
    model = Net(norm).eval()
    seen = {}
    for name in (source, branch):
        getattr(model, name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.__setitem__(name, output.clone()))
    getattr(model, target).register_forward_pre_hook(
        lambda module, inputs: seen.__setitem__(target, inputs[0].clone()))
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(seen[target], seen[source] + seen[branch])
    assert seen[source].abs().sum() > 0 and seen[branch].abs().sum() > 0
