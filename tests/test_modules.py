"""The modules are drop-in torch.nn modules: same constructor, parameters, initialisation,
state_dict keys, repr and numerics."""

from __future__ import annotations

import pytest
import torch

import manualconv

# (name, manualconv class, torch class, constructor args, kwargs, input size)
MODULES = [
    ("conv-default", manualconv.Conv2d, torch.nn.Conv2d, (3, 8, 3), {}, (2, 3, 9, 9)),
    ("conv-options", manualconv.Conv2d, torch.nn.Conv2d, (4, 6, (3, 2)),
     dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=False), (2, 4, 9, 8)),
    ("conv-same", manualconv.Conv2d, torch.nn.Conv2d, (3, 4, 4), dict(padding="same"), (1, 3, 7, 7)),
    ("conv-reflect", manualconv.Conv2d, torch.nn.Conv2d, (3, 4, 3), dict(padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    ("conv-replicate", manualconv.Conv2d, torch.nn.Conv2d, (3, 4, 3), dict(padding=2, padding_mode="replicate", stride=2), (2, 3, 6, 6)),
    ("conv-circular", manualconv.Conv2d, torch.nn.Conv2d, (3, 4, 3), dict(padding=1, padding_mode="circular"), (2, 3, 6, 6)),
    ("maxpool", manualconv.MaxPool2d, torch.nn.MaxPool2d, (3,), dict(stride=2, padding=1, ceil_mode=True), (2, 3, 8, 8)),
    ("maxpool-indices", manualconv.MaxPool2d, torch.nn.MaxPool2d, (2,), dict(return_indices=True, dilation=2), (2, 3, 8, 8)),
    ("avgpool", manualconv.AvgPool2d, torch.nn.AvgPool2d, (3,), dict(stride=2, padding=1, count_include_pad=False), (2, 3, 8, 8)),
    ("avgpool-divisor", manualconv.AvgPool2d, torch.nn.AvgPool2d, (2,), dict(divisor_override=3, ceil_mode=True), (2, 3, 7, 7)),
]


def _pair(spec, seed=0):
    name, ours_cls, torch_cls, args, kwargs, _ = spec
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs)
    torch.manual_seed(seed)
    native = torch_cls(*args, **kwargs)
    return ours, native


@pytest.mark.parametrize("spec", MODULES, ids=[m[0] for m in MODULES])
def test_module_is_drop_in(spec, backend):
    ours, native = _pair(spec)
    name = spec[0]
    assert isinstance(ours, type(native)), name
    assert repr(ours) == repr(native), name
    assert ours.state_dict().keys() == native.state_dict().keys(), name
    for key, value in native.state_dict().items():  # same initialisation from the same seed
        assert torch.equal(ours.state_dict()[key], value), f"{name}: {key} initialised differently"
    # state dicts load both ways
    other_ours, other_native = _pair(spec, seed=1)
    other_ours.load_state_dict(native.state_dict())
    native.load_state_dict(other_ours.state_dict())


@pytest.mark.parametrize("spec", MODULES, ids=[m[0] for m in MODULES])
def test_module_matches_native_in_float64(spec, backend):
    ours, native = _pair(spec)
    ours, native = ours.double(), native.double()
    x = torch.randn(spec[5], dtype=torch.float64)
    x_ours, x_native = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_native = ours(x_ours), native(x_native)
    if isinstance(y_native, tuple):
        assert torch.equal(y_ours[1], y_native[1]), spec[0]
        y_ours, y_native = y_ours[0], y_native[0]
    # float64 and sums of at most a few hundred terms: agreement to 1e-12 relative
    torch.testing.assert_close(y_ours, y_native, rtol=1e-12, atol=1e-12, msg=lambda m: f"{spec[0]}: {m}")
    grad = torch.randn_like(y_native)
    y_ours.backward(grad)
    y_native.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_native.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{spec[0]}: {m}")
    for (pname, p_ours), p_native in zip(ours.named_parameters(), native.parameters()):
        torch.testing.assert_close(p_ours.grad, p_native.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{spec[0]}.{pname}: {m}")


CONSTRUCTOR_ERRORS = [
    ("in-channels-not-divisible", dict(in_channels=5, out_channels=6, kernel_size=3, groups=2), "in_channels must be divisible by groups"),
    ("out-channels-not-divisible", dict(in_channels=4, out_channels=5, kernel_size=3, groups=2), "out_channels must be divisible by groups"),
    ("same-with-stride", dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding="same"), "padding='same' is not supported for strided"),
    ("bad-padding-mode", dict(in_channels=4, out_channels=4, kernel_size=3, padding_mode="mirror"), "padding_mode must be one of"),
]


@pytest.mark.parametrize("name,kwargs,pattern", CONSTRUCTOR_ERRORS, ids=[e[0] for e in CONSTRUCTOR_ERRORS])
def test_conv_constructor_rejects_bad_arguments(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        torch.nn.Conv2d(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        manualconv.Conv2d(**kwargs)


def test_swapped_into_a_model_trains_like_native(backend):
    def model(conv, pool, avg):
        torch.manual_seed(0)
        return torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.ReLU(), pool(2), conv(8, 8, 3, padding=1),
                                   torch.nn.ReLU(), avg(2), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)).double()

    ours = model(manualconv.Conv2d, manualconv.MaxPool2d, manualconv.AvgPool2d)
    native = model(torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)
    x, target = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    for net in (ours, native):
        optimiser = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(net(x), target).backward()
            optimiser.step()
    for (name, p), q in zip(ours.named_parameters(), native.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_backend_switch():
    before = manualconv.get_backend()
    with manualconv.use_backend("reference"):
        assert manualconv.get_backend() == "reference"
    assert manualconv.get_backend() == before
    with pytest.raises(ValueError, match="backend must be one of"):
        manualconv.set_backend("cuda-magic")
