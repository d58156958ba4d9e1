import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from conftest import NEEDS_CUDA, ROOT
from models import (ACTIVATIONS, BLOCKS, GN_GROUPS, NORMS, ConvBlock, GlobalAvgPool, GroupNorm,
                    Net, count_parameters)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("norm", NORMS)
def test_under_parameter_budget(norm, blocks):
    assert 40_000 < count_parameters(Net(norm, blocks)) < 50_000


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("norm", NORMS)
def test_outputs_ten_logits_per_image(norm, blocks):
    assert Net(norm, blocks)(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_separable_blocks_split_c3_to_c9_into_depthwise_and_pointwise_convs():
    model = Net("bn", "separable")
    for name in ("conv1", "conv2"):
        (conv,) = [m for m in getattr(model, name).modules() if isinstance(m, nn.Conv2d)]
        assert conv.kernel_size == (3, 3) and conv.groups == 1
    for name in ("conv3", "conv4", "conv5", "conv7", "conv8", "conv9"):
        depthwise, pointwise = [m for m in getattr(model, name).modules() if isinstance(m, nn.Conv2d)]
        assert depthwise.kernel_size == (3, 3) and depthwise.groups == depthwise.in_channels
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("norm, groups", [("ln", 1), ("gn", GN_GROUPS)])
def test_layer_and_group_norm_use_groupnorm_and_no_batchnorm(norm, groups, blocks):
    modules = list(Net(norm, blocks).modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    group_norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 8  # one per 3x3 conv block
    assert all(m.num_groups == groups for m in group_norms)


def test_batch_norm_variant_uses_batchnorm_only():
    modules = list(Net("bn").modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) == 8
    assert not any(isinstance(m, nn.GroupNorm) for m in modules)


@pytest.mark.parametrize("activation, module, other", [("relu", nn.ReLU, nn.GELU),
                                                      ("gelu", nn.GELU, nn.ReLU)])
def test_every_block_ends_in_the_chosen_activation(activation, module, other):
    model = Net("gn", "separable", activation=activation)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv7", "conv8", "conv9"):
        assert isinstance(getattr(model, name)[-1], module)
    assert not any(isinstance(m, other) for m in model.modules())


def test_activation_changes_outputs_not_parameters():
    torch.manual_seed(0)
    relu = Net("bn", "separable", activation="relu").eval()
    gelu = Net("bn", "separable", activation="gelu").eval()
    weights = {k: v for k, v in relu.state_dict().items() if k != "_extra_state"}
    gelu.load_state_dict(weights, strict=False)  # same weights, same names
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(relu(x), gelu(x))


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match=", ".join(ACTIVATIONS)):
        Net("bn", "separable", activation="tanh")


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match="bn, ln, gn"):
        Net("xyz")


def test_unknown_blocks_name_the_choices():
    with pytest.raises(ValueError, match="plain, separable"):
        Net("bn", "xyz")


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("source, branch, target", [("conv3", "conv5", "trans6"),
                                                    ("conv7", "conv9", "gap")])
def test_skip_connection_adds_source_to_branch(norm, blocks, source, branch, target):
    model = Net(norm, blocks).eval()
    seen = {}
    for name in (source, branch):
        getattr(model, name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.__setitem__(name, output.clone()))
    getattr(model, target).register_forward_pre_hook(
        lambda module, inputs: seen.__setitem__(target, inputs[0].clone()))
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(seen[target], seen[source] + seen[branch])
    assert seen[source].abs().sum() > 0 and seen[branch].abs().sum() > 0


def test_global_avg_pool_averages_every_position():
    x = torch.randn(2, 5, 8, 8)
    torch.testing.assert_close(GlobalAvgPool()(x), x.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_backward_keeps_channels_last_gradients(norm, amp):
    # Mixed layouts make PyTorch's activation backward kernels several times
    # slower on the CPU; nn.AdaptiveAvgPool2d(1) as the GAP sent NCHW gradients to C7-C9.
    # In bfloat16, GN's C1 and C2 normalize in NCHW and must come back (GroupNorm).
    model = Net(norm, "separable", activation="gelu").to(memory_format=torch.channels_last)
    layouts = {}

    def record_gradient_layout(name):
        def hook(module, inputs, output):
            output.register_hook(lambda grad: layouts.__setitem__(
                name, grad.is_contiguous(memory_format=torch.channels_last)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, ConvBlock):
            module.register_forward_hook(record_gradient_layout(name))
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        output = model(x)
    output.float().sum().backward()
    assert len(layouts) == 8 and all(layouts.values()), layouts


def test_group_norm_takes_small_bfloat16_groups_through_nchw(monkeypatch):
    # PyTorch's channels_last kernels take about 7x as long for them; the rest run as they come.
    nchw_inputs = []
    group_norm = F.group_norm
    monkeypatch.setattr(F, "group_norm", lambda x, *args: nchw_inputs.append(x.is_contiguous())
                        or group_norm(x, *args))
    for groups, dtype, through_nchw in ((4, torch.bfloat16, True), (1, torch.bfloat16, False),
                                        (4, torch.float32, False)):
        x = torch.randn(2, 16, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        norm = GroupNorm(groups, 16)
        nn.init.normal_(norm.weight)
        nchw_inputs.clear()
        y = norm(x.requires_grad_())
        assert nchw_inputs == [through_nchw]
        assert y.is_contiguous(memory_format=torch.channels_last)
        expected = group_norm(x, groups, norm.weight, norm.bias)
        torch.testing.assert_close(y, expected)
        gradient = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, gradient),
                                   torch.autograd.grad(expected, x, gradient))


def test_net_of_a_norm_alone_is_the_default_recipes_network():
    """Net(norm) is what train.py trains: separable blocks, the norm's activation."""
    for norm, activation in (("bn", nn.ReLU), ("ln", nn.GELU), ("gn", nn.GELU)):
        model = Net(norm)
        assert model.config == {"norm": norm, "blocks": "separable",
                                "activation": activation.__name__.lower()}
        assert model.conv3[0].groups > 1 and isinstance(model.conv3[-1], activation)


def test_saved_model_loads_back_through_models_load_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = Net("gn", "plain", activation="relu").eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = models.load(tmp_path)  # a run folder, or the file itself
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("other", [dict(activation="relu"), dict(blocks="plain"), dict(norm="bn")])
def test_weights_of_another_network_are_refused_before_anything_is_loaded(other):
    """GELU weights fit a ReLU network's shapes: only the file's config tells them apart."""
    saved = Net("ln").state_dict()
    model = Net(**{"norm": "ln", **other})
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "_extra_state"}
    with pytest.raises(models.ModelFileError, match="another network"):
        model.load_state_dict(saved)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("content, message", [
    (lambda: {k: v for k, v in Net("bn").state_dict().items() if k != "_extra_state"},
     "does not say which network"),
    (lambda: {"weights": torch.zeros(3)}, "does not say which network"),
    (lambda: "not a model", "does not say which network"),
])
def test_models_load_refuses_a_file_that_names_no_network(tmp_path, content, message):
    torch.save(content(), tmp_path / "model.pt")
    with pytest.raises(models.ModelFileError, match=message):
        models.load(tmp_path / "model.pt")


def test_models_load_of_a_missing_or_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(models.ModelFileError, match="no such file"):
        models.load(tmp_path / "absent.pt")
    (tmp_path / "model.pt").write_text("garbage")
    with pytest.raises(models.ModelFileError, match="not a readable model file"):
        models.load(tmp_path)


@pytest.mark.parametrize("run", ["results", "results/seed1", "results/seed2"])
@pytest.mark.parametrize("norm", NORMS)
def test_committed_models_have_the_names_and_shapes_of_net_of_their_norm(run, norm):
    saved = torch.load(ROOT / run / norm / "model.pt", weights_only=True)
    expected = Net(norm).state_dict()
    assert saved["_extra_state"] == expected["_extra_state"]
    assert {k: v.shape for k, v in saved.items() if k != "_extra_state"} == {
        k: v.shape for k, v in expected.items() if k != "_extra_state"}


# ----------------------------------------------------------------------------
# What each norm averages over: BN's statistics batch, GN's group count (issue 37)
# ----------------------------------------------------------------------------

def bn_output_and_gradients(layer, x, loss_weights=None):
    """The layer's training output on x and the gradients of a loss weighting each output
    element (by default, evenly from -1 to 1 over the elements)."""
    if loss_weights is None:
        loss_weights = torch.linspace(-1, 1, x.numel(), device=x.device).view_as(x)
    x = x.clone().requires_grad_()
    out = layer.train()(x)
    (out * loss_weights).sum().backward()
    return out, x.grad, layer.weight.grad, layer.bias.grad


def test_a_statistics_batch_of_the_whole_batch_is_batchnorm_bit_for_bit():
    x = torch.randn(16, 8, 5, 5)
    ghost, plain = models.GhostBatchNorm2d(8, 16), nn.BatchNorm2d(8)
    for a, b in zip(bn_output_and_gradients(ghost, x), bn_output_and_gradients(plain, x)):
        assert torch.equal(a, b)
    assert torch.equal(ghost.running_mean, plain.running_mean)
    assert torch.equal(ghost.running_var, plain.running_var)
    torch.manual_seed(0)
    whole = Net("bn", bn_batch=16)(x[:, :3].repeat(1, 1, 7, 7)[..., :32, :32])
    torch.manual_seed(0)
    assert torch.equal(whole, Net("bn")(x[:, :3].repeat(1, 1, 7, 7)[..., :32, :32]))


@pytest.mark.parametrize("compiles", [True, False], ids=["compiled", "a BN call per group"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_a_smaller_statistics_batch_normalizes_each_group_as_batchnorm_would_alone(
        compiles, memory_format, device, monkeypatch):
    monkeypatch.setattr(models.GhostBatchNorm2d, "compiles", compiles)
    x = torch.randn(20, 8, 5, 5, device=device).contiguous(memory_format=memory_format)
    ghost = models.GhostBatchNorm2d(8, 8).to(device)  # groups of 8, 8 and a last one of 4
    out, grad, grad_weight, grad_bias = bn_output_and_gradients(ghost, x)
    assert out.is_contiguous(memory_format=memory_format)
    # Each group alone, with the part of the loss weights that falls on it.
    weights = torch.linspace(-1, 1, x.numel(), device=device).view_as(x).split(8)
    alone = [bn_output_and_gradients(nn.BatchNorm2d(8).to(device), group, weight)
             for group, weight in zip(x.split(8), weights)]
    # To float32's rounding: the compiled kernels sum in another order than BN's.
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    close(out, torch.cat([a[0] for a in alone]))
    close(grad, torch.cat([a[1] for a in alone]))
    close(grad_weight, sum(a[2] for a in alone))
    close(grad_bias, sum(a[3] for a in alone))
    plain = [nn.BatchNorm2d(8).to(device).train() for _ in range(3)]
    for layer, group in zip(plain, x.split(8)):
        layer(group)
    # The running statistics: the mean of what each group alone would have moved them to.
    torch.testing.assert_close(ghost.running_mean, torch.stack([p.running_mean for p in plain]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([p.running_var for p in plain]).mean(0))
    ghost.eval()  # evaluation: the running statistics, as BN's
    plain_eval = nn.BatchNorm2d(8).to(device).eval()
    plain_eval.load_state_dict(ghost.state_dict())
    assert torch.equal(ghost(x), plain_eval(x))


def test_ghost_batches_take_a_bn_call_per_group_where_torch_compile_fails(monkeypatch):
    import torch._inductor.config
    # A machine without a C++ compiler, and a shape compiled nowhere else, nor cached.
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/no/such/compiler"))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(models.GhostBatchNorm2d, "compiles", True)
    x = torch.randn(12, 7, 3, 3)
    with pytest.warns(UserWarning, match="a BN call per group, slower: torch.compile failed"):
        out = models.GhostBatchNorm2d(7, 4).train()(x)
    assert not models.GhostBatchNorm2d.compiles  # and later batches go that way at once
    torch.testing.assert_close(out, torch.cat([F.batch_norm(group, None, None, training=True)
                                               for group in x.split(4)]))


@pytest.mark.parametrize("norm, options", [("ln", {}), ("gn", {}), ("gn", {"gn_groups": 1}),
                                           ("gn", {"gn_groups": "channel"})])
def test_ln_and_gn_normalize_each_image_whatever_the_others_in_its_batch(norm, options):
    layer = models.make_norm(norm, 16, **options).train()
    x = torch.randn(6, 16, 4, 4)
    others_changed = torch.cat([x[:1], 5 * torch.randn(5, 16, 4, 4) + 3])
    assert torch.equal(layer(x)[0], layer(others_changed)[0])


def test_one_group_is_the_ln_variant_and_one_per_channel_is_instance_norm():
    x = torch.randn(4, 16, 6, 6)
    torch.testing.assert_close(models.make_norm("gn", 16, gn_groups=1)(x),
                               models.make_norm("ln", 16)(x))
    per_channel, instance = models.make_norm("gn", 16, gn_groups="channel"), nn.InstanceNorm2d(16, affine=True)
    for layer in (per_channel, instance):  # the same affine, not the identity
        nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(1))
        nn.init.normal_(layer.bias, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(per_channel(x), instance(x))


@pytest.mark.parametrize("groups", [3, 5, 0, 32])
def test_a_group_count_that_does_not_divide_every_width_is_refused(groups):
    with pytest.raises(ValueError, match="must divide every width"):
        Net("gn", gn_groups=groups)


@pytest.mark.parametrize("norm, options", [("bn", {"bn_batch": 4}), ("gn", {"gn_groups": 8}),
                                           ("gn", {"gn_groups": "channel"})])
def test_a_saved_model_with_a_statistics_batch_or_group_count_loads_back(tmp_path, norm, options):
    model = Net(norm, **options)
    model.train()(torch.randn(8, 3, 32, 32))  # BN: running statistics from ghost batches
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = models.load(tmp_path / "model.pt")
    assert loaded.config == model.config and {**options}.items() <= loaded.config.items()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    if norm == "bn":
        assert all(m.ghost_batch == 4 for m in loaded.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_default_network_with_the_options_spelled_out_has_the_default_config():
    """Model files written before the options existed name the same network."""
    assert Net("gn", gn_groups=GN_GROUPS).config == Net("gn").config
    assert Net("bn", bn_batch=None).config == Net("bn").config


def test_batch_statistics_makes_bn_use_each_batchs_own_and_keeps_the_running_ones():
    torch.manual_seed(0)
    model = Net("bn")
    model.train()(torch.randn(16, 3, 32, 32))  # running statistics that are not the init's
    model.eval()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 32, 32)
    others_changed = torch.cat([x[:1], 3 * torch.randn(3, 3, 32, 32)])
    with models.batch_statistics(model):
        assert not torch.equal(model(x)[0], model(others_changed)[0])  # depends on the batch
        layer = model.conv1[1]
        features = model.conv1[0](x)
        torch.testing.assert_close(layer(features), F.batch_norm(
            features, None, None, layer.weight, layer.bias, training=True))
    assert torch.equal(model(x)[0], model(others_changed)[0])  # running statistics again
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in running.items())
