"""ONNX export of converted models: standard ONNX operators only, run by onnxruntime, equal to
manualconv's (and torch.nn's) output within the float32 bound below; max-pool indices exactly.

The bound. Every layer here (conv, transposed conv, linear, average pools) computes sums of at
most n_l products, with an error ≤ n_l·ε·(the layer applied to absolute values) in float32 in any
order (ε = 2⁻²⁴); ReLU and max pooling are exact. Each layer is monotone in |input| once its
weights are replaced by their absolute values, so the errors carried through the later layers stay
below the "absolute network" (|W|, |b|, on |x|) evaluated in float64: every float32 evaluation is
within (Σ_l n_l)·ε·N_abs(|x|) of the exact result, and two of them (onnxruntime's and
manualconv's) within twice that of each other.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import onnxruntime
import torch

import manualconv
import manualconv.onnx
from oracle import EPS32


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),          # 13 → 7
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2),  # 7 → 3
        torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1),  # 3 → 6
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),  # 6 → 6
        torch.nn.AdaptiveMaxPool2d(4),                                        # non-uniform windows
        torch.nn.AdaptiveAvgPool2d(3),                                        # non-uniform windows
        torch.nn.AdaptiveAvgPool2d(1),                                        # global
        torch.nn.Flatten(),
        torch.nn.Linear(6, 5),
    )


def _reduction_lengths(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Σ_l n_l: the longest sum in each layer's output entries (+1 for a bias)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):  # C/g input channels × taps
            total += math.prod(module.weight.shape[1:]) + 1
        elif isinstance(module, torch.nn.ConvTranspose2d):  # weight (C_in, O/g, kH, kW): C_in/g × taps at most
            total += module.weight.shape[0] // module.groups * math.prod(module.weight.shape[2:]) + 1
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features + 1
        elif isinstance(module, torch.nn.AvgPool2d):
            total += module.kernel_size ** 2 + 1
        elif isinstance(module, torch.nn.AdaptiveAvgPool2d):
            total += inputs[0].shape[-1] * inputs[0].shape[-2] + 1

    hooks = [m.register_forward_hook(count) for m in model]
    model(x)
    for h in hooks:
        h.remove()
    return total


def _absolute_network(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """N_abs(|x|): the model in float64 with |W|, |b|, on |x|."""
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in wide.parameters():
            p.abs_()
        return wide(x.double().abs())


def _run_onnxruntime(program, *inputs):
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]


def _assert_standard_onnx(program) -> set:
    """Only the default ONNX domain (no custom operators); returns the operator types used."""
    model = program.model_proto
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= {""}, f"non-standard ONNX domains in the graph: {domains}"
    return {n.op_type for n in model.graph.node}


def test_converted_cnn_exports_and_runs_in_onnxruntime(backend):
    native = small_cnn().eval()
    model = manualconv.convert(copy.deepcopy(native)).eval()
    x = torch.randn(2, 3, 13, 13, generator=torch.Generator().manual_seed(1))
    program = torch.onnx.export(model, (x,), dynamo=True,
                                custom_translation_table=manualconv.onnx.translation_table())
    op_types = _assert_standard_onnx(program)
    if backend == "cpp":  # manualconv's operators became their ONNX counterparts
        assert {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool"} <= op_types, op_types
    (ours_onnx,) = _run_onnxruntime(program, x)
    with torch.no_grad():
        ours, theirs = model(x), native(x)
    bound = 2 * _reduction_lengths(native, x) * EPS32 * _absolute_network(native, x)
    assert ((ours_onnx.double() - ours.double()).abs() <= bound).all(), (ours_onnx - ours).abs().max()
    assert ((ours_onnx.double() - theirs.double()).abs() <= bound).all(), (ours_onnx - theirs).abs().max()


class Norms(torch.nn.Module):
    """BatchNorm2d (eval: running statistics), GroupNorm and LayerNorm, each on the input itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.gn, self.ln = torch.nn.BatchNorm2d(6), torch.nn.GroupNorm(2, 6), torch.nn.LayerNorm(6 * 4 * 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape))
            self.bn.running_mean.copy_(torch.randn(6))
            self.bn.running_var.copy_(torch.rand(6) + 0.5)

    def forward(self, x):
        return self.bn(x), self.gn(x), self.ln(x.flatten(1))


def _norm_bound(x, mean, invstd, weight, bias, n):
    """Per entry (n + 8)·ε·M, M = (max|x| over the set + |μ|)·σ⁻¹·|γ| + |β|: the two-pass mean and
    variance are n-term sums (error ≤ n·ε relative to max|x|, first order), then at most 8
    roundings (centre, square, divide, add ε, square root, reciprocal, scale, shift)."""
    m = (x.abs().amax(-1, keepdim=True) + mean.abs()) * invstd * weight.abs() + bias.abs()
    return (n + 8) * EPS32 * m.expand(x.shape)


def test_converted_norms_export(cpp):
    """The norms' operators (batch_norm_apply, the group/layer norms' layer_norm_forward) export
    to standard operators; onnxruntime's results and manualconv's are each within the bound of
    the float64 result."""
    native = Norms().eval()
    model = manualconv.convert(copy.deepcopy(native)).eval()
    x = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(3)) + 0.5
    program = manualconv.onnx.export(model, (x,))
    _assert_standard_onnx(program)
    got = _run_onnxruntime(program, x)
    with torch.no_grad():
        ours = model(x)
        exact = Norms().double().eval()(x.double())
    x64, bn, gn, ln = x.double(), native.bn.double(), native.gn.double(), native.ln.double()
    with torch.no_grad():
        # batch norm, eval: no sums (n = 0), per channel
        per_channel = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
        bn_bound = 8 * EPS32 * ((x64.abs() + per_channel(bn.running_mean).abs()) * per_channel((bn.running_var + bn.eps).rsqrt())
                                * per_channel(bn.weight).abs() + per_channel(bn.bias).abs())
        # group norm: sets of 3 channels × 20 entries; layer norm: the 120 entries of a sample
        groups = x64.reshape(2, 2, -1)
        g_mean, g_invstd = groups.mean(-1, keepdim=True), (groups.var(-1, unbiased=False, keepdim=True) + gn.eps).rsqrt()
        gn_bound = _norm_bound(groups, g_mean, g_invstd, torch.ones(()), torch.zeros(()), 60).reshape(2, 2, 3, 20)
        gn_bound = gn_bound * gn.weight.abs().reshape(1, 2, 3, 1) + 8 * EPS32 * gn.bias.abs().reshape(1, 2, 3, 1)
        rows = x64.flatten(1)
        l_mean, l_invstd = rows.mean(-1, keepdim=True), (rows.var(-1, unbiased=False, keepdim=True) + ln.eps).rsqrt()
        ln_bound = _norm_bound(rows, l_mean, l_invstd, ln.weight, ln.bias, 120)
    for name, g, o, e, bound in zip(("batch_norm", "group_norm", "layer_norm"), got, ours, exact,
                                    (bn_bound, gn_bound.reshape(2, 6, 4, 5), ln_bound)):
        assert ((g.double() - e).abs() <= bound).all(), f"onnxruntime {name}: {(g.double() - e).abs().max():.3e}"
        assert ((o.double() - e).abs() <= bound).all(), f"manualconv {name}: {(o.double() - e).abs().max():.3e}"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_exports(cpp, approximate):
    """gelu_forward (csrc/gelu.cpp) exports to Erf / Tanh, Mul, Add; onnxruntime's result equals
    torch.nn's within float32 elementwise rounding (a few operations at 2⁻²⁴ relative, and the
    cancellation of 1 + erf(x/√2) for x ≪ 0: absolute 1e-6, as tests/test_activations.py)."""
    model = manualconv.convert(torch.nn.Sequential(torch.nn.GELU(approximate))).eval()
    x = 4 * torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    program = manualconv.onnx.export(model, (x,))
    _assert_standard_onnx(program)
    (got,) = _run_onnxruntime(program, x)
    expected = torch.nn.functional.gelu(x.double(), approximate=approximate)
    torch.testing.assert_close(torch.as_tensor(got).double(), expected, rtol=2e-6, atol=1e-6)


def test_layout_copy_exports_as_identity(cpp):
    """layout_copy (csrc/layout_copy.cpp) exports to Identity: onnxruntime returns the input's values
    exactly (ONNX tensors have no memory layout)."""

    class ToChannelsLast(torch.nn.Module):
        def forward(self, x):
            return torch.ops.manualconv.layout_copy(x, True)

    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(6))
    program = manualconv.onnx.export(ToChannelsLast().eval(), (x,))
    _assert_standard_onnx(program)
    (got,) = _run_onnxruntime(program, x)
    assert torch.equal(torch.as_tensor(got), x)


def test_activations_export(cpp):
    """activation_forward (csrc/activations.cpp) exports to Sigmoid·x, Clip, HardSwish, HardSigmoid,
    LeakyRelu and Elu; onnxruntime's results equal torch.nn's within float32 elementwise rounding
    (a few operations at 2⁻²⁴ relative; absolute 1e-6 where a result is near 0, as
    tests/test_activations.py)."""
    layers = [torch.nn.SiLU(), torch.nn.Hardtanh(-2.0, 6.0), torch.nn.ReLU6(), torch.nn.Hardswish(),
              torch.nn.Hardsigmoid(), torch.nn.LeakyReLU(0.2), torch.nn.ELU(0.5)]

    class EachActivation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            return tuple(layer(x) for layer in self.layers)

    model = manualconv.convert(EachActivation()).eval()
    x = 4 * torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(5))
    program = manualconv.onnx.export(model, (x,))
    _assert_standard_onnx(program)
    kernels = [node.target for node in program.exported_program.graph.nodes
               if node.op == "call_function" and "manualconv" in str(node.target)]
    assert [str(k) for k in kernels] == ["manualconv.activation_forward.default"] * len(layers), kernels
    nodes = {node.op_type for node in program.model_proto.graph.node}
    assert {"Sigmoid", "Clip", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu"} <= nodes, nodes
    for layer, got in zip(layers, _run_onnxruntime(program, x)):
        torch.testing.assert_close(torch.as_tensor(got).double(), layer(x.double()), rtol=2e-6, atol=1e-6)


class PoolsWithIndices(torch.nn.Module):
    """max_pool2d and adaptive_max_pool2d (uniform and non-uniform windows) returning indices,
    on an input full of ties (ReLU zeros), and avg_pool2d with divisor_override."""

    def forward(self, x):
        import manualconv.functional as MF

        z = MF.relu(x)
        y1, i1 = MF.max_pool2d(z, 3, stride=2, padding=1, dilation=1, return_indices=True)
        y2, i2 = MF.adaptive_max_pool2d(z, (3, 5), return_indices=True)
        y3, i3 = MF.adaptive_max_pool2d(z, 2, return_indices=True)
        return y1, i1, y2, i2, y3, i3, MF.avg_pool2d(x, 2, padding=1, divisor_override=3)


def test_pool_indices_export_exactly(cpp):
    """Through manualconv.onnx.export: ONNX's whole-tensor MaxPool indices become torch's
    per-plane ones, ties resolved to the first maximum as torch does; pooled values are exact
    (max) or within the average's bound (a 4-term sum / 3: (4 + 1)·ε relative to Σ|x|/3)."""
    x = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(2))
    model = PoolsWithIndices().eval()
    program = manualconv.onnx.export(model, (x,))
    _assert_standard_onnx(program)
    outputs = _run_onnxruntime(program, x)
    expected = model(x)
    for k, (got, want) in enumerate(zip(outputs[:6], expected[:6])):
        assert torch.equal(got, want), f"output {k} differs: {(got.double() - want.double()).abs().max()}"
    bound = 2 * 5 * EPS32 * torch.nn.functional.avg_pool2d(x.double().abs(), 2, padding=1, divisor_override=3)
    assert ((outputs[6].double() - expected[6].double()).abs() <= bound).all()


def test_translation_table_covers_every_forward_operator(cpp):
    """Every manualconv operator an inference graph can hold has a translation (the rest are
    backward operators: grad_*/backward, which exported inference graphs never contain, the
    training-only ones (dropout's product: in eval mode dropout is the identity, checked here),
    and the queries without tensor arguments: cpu_capability, conv2d_selected_kernel)."""
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("manualconv::")}

    def takes_tensors(name: str) -> bool:
        schema = getattr(torch.ops.manualconv, name).default._schema
        return any("Tensor" in str(argument.type) for argument in schema.arguments)
    backward = ("backward", "grad_weight", "grad_bias")  # (conv2d_grad_input is conv_transpose2d's forward)
    forward = {name for name in registered if not any(b in name for b in backward) and takes_tensors(name)
               and name not in manualconv.onnx.TRAINING_ONLY_OPERATORS}
    x = torch.randn(2, 3, 4, 4)
    with manualconv.use_backend("cpp"):
        assert manualconv.Dropout(0.5).eval()(x) is x and manualconv.Dropout2d(0.5).eval()(x) is x
    assert {"conv2d_forward", "gelu_forward", "group_norm_forward"} <= forward  # the filter keeps the graph ops
    translated = {op.name().split("::")[1] for op in manualconv.onnx.translation_table()}
    assert forward <= translated, f"no ONNX translation for {sorted(forward - translated)}"
