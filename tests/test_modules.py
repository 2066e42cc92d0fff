"""The modules are drop-in torch.nn modules: same constructor, parameters, initialisation,
state_dict keys, repr and numerics."""

from __future__ import annotations

import pytest
import torch

import manualconv
from manualconv.convert import TO_MANUAL, TO_NATIVE
from cases import OPS, backend_params

# (record, module sample): each op's module samples, built as its manual and native classes
MODULES = [(record, sample) for record in OPS.values() for sample in record.module_samples]
MODULES_PER_BACKEND = [p for record, sample in MODULES for p in backend_params(record, (record, sample), sample.name)]


def _pair(record, sample, seed=0):
    torch.manual_seed(seed)
    ours = record.modules["manual"](*sample.args, **sample.kwargs)
    torch.manual_seed(seed)
    native = record.modules["native"](*sample.args, **sample.kwargs)
    return ours, native


@pytest.mark.parametrize("record,sample,backend", MODULES_PER_BACKEND, indirect=["backend"])
def test_module_is_drop_in(record, sample, backend):
    ours, native = _pair(record, sample)
    name = sample.name
    assert isinstance(ours, type(native)), name
    assert repr(ours) == repr(native), name
    assert ours.state_dict().keys() == native.state_dict().keys(), name
    for key, value in native.state_dict().items():  # same initialisation from the same seed
        assert torch.equal(ours.state_dict()[key], value), f"{name}: {key} initialised differently"
    # state dicts load both ways
    other_ours, other_native = _pair(record, sample, seed=1)
    other_ours.load_state_dict(native.state_dict())
    native.load_state_dict(other_ours.state_dict())


@pytest.mark.parametrize("record,sample,backend", MODULES_PER_BACKEND, indirect=["backend"])
def test_module_matches_native_in_float64(record, sample, backend):
    ours, native = _pair(record, sample)
    ours, native = ours.double(), native.double()
    x = torch.randn(sample.input, dtype=torch.float64)
    x_ours, x_native = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_native = ours(x_ours), native(x_native)
    if isinstance(y_native, tuple):
        assert torch.equal(y_ours[1], y_native[1]), sample.name
        y_ours, y_native = y_ours[0], y_native[0]
    # float64 and sums of at most a few hundred terms: agreement to 1e-12 relative
    torch.testing.assert_close(y_ours, y_native, rtol=1e-12, atol=1e-12, msg=lambda m: f"{sample.name}: {m}")
    grad = torch.randn_like(y_native)
    y_ours.backward(grad)
    y_native.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_native.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{sample.name}: {m}")
    for (pname, p_ours), p_native in zip(ours.named_parameters(), native.parameters()):
        torch.testing.assert_close(p_ours.grad, p_native.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{sample.name}.{pname}: {m}")


MODULE_PAIRS = [record for record in OPS.values() if record.modules.keys() == {"manual", "native"}]


@pytest.mark.parametrize("record", MODULE_PAIRS, ids=lambda r: r.name)
def test_convert_maps_the_records_module_pair(record):
    """Each record's manual module is the drop-in subclass convert() swaps its native module for."""
    manual, native = record.modules["manual"], record.modules["native"]
    assert issubclass(manual, native), record.name
    assert TO_MANUAL[native] is manual and TO_NATIVE[manual] is native, record.name


CONSTRUCTOR_ERRORS = [(record, error) for record in OPS.values() for error in record.module_errors]


@pytest.mark.parametrize("record,error", CONSTRUCTOR_ERRORS, ids=[e.name for _, e in CONSTRUCTOR_ERRORS])
def test_constructor_rejects_bad_arguments(record, error):
    error_type, pattern = error.error
    with pytest.raises(error_type, match=pattern):
        record.modules["native"](**error.kwargs)
    with pytest.raises(error_type, match=pattern):
        record.modules["manual"](**error.kwargs)


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
