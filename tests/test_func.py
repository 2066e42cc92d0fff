"""torch.func over manualconv: vmap(grad) (per-sample gradients), jacrev, jacfwd, jvp and hessian
equal those of the torch.nn model, on both backends; each Function's vmap rule (every branch:
mapped input, mapped weight, both, mapped bias) and jvp rule against torch's own; and the
per-sample gradients equal the gradients of each sample alone."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import manualconv
import manualconv.functional as MF
from test_audit import RecordAtenOps, forbidden

# float64 throughout. Both sides compute the same sums in different orders (manualconv's
# im2col/GEMM or tap loops against oneDNN's kernels), so they differ by rounding alone: each
# entry is a sum of at most a few hundred products of size ≤ 10, whose rounding error is below
# n·ε·Σ|terms| ≈ 300 · 1.1e-16 · 3e3 ≈ 1e-10 — the bound used here (relative 1e-9 for large entries).
assert_close = functools.partial(torch.testing.assert_close, rtol=1e-9, atol=1e-10)

CLASSES = 5


def small_net():
    """conv (bias) → ReLU → max pool → grouped strided conv → sigmoid → avg pool → adaptive max
    pool → linear → tanh → linear: every kind of layer in one net (input 3×10×10)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False), nn.Sigmoid(),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, CLASSES),
    ).double()


def tiny_net():
    """A smaller conv → ReLU → max pool → adaptive avg pool → linear net for the hessian."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(12, CLASSES)).double()


def pair(build):
    native = build()
    return native, manualconv.convert(native)


def params_of(model):
    return {name: p.detach() for name, p in model.named_parameters()}


def data(n=6, channels=3, size=10):
    torch.manual_seed(1)
    x = torch.randn(n, channels, size, size, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (n,))
    return x, labels, F.one_hot(labels, CLASSES).double()


def sample_loss(model, loss_fn):
    """J(params, x_n, t_n) of one sample (batch of one); t_n a probability row (index targets
    can't be vmapped through cross_entropy's bounds check)."""
    def loss(params, x, target):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), target.unsqueeze(0))
    return loss


def test_vmap_grad_per_sample_gradients_equal_native_and_each_sample_alone(backend):
    native, manual = pair(small_net)
    x, labels, onehot = data()
    per_sample = {}
    for key, model, loss_fn in (("native", native, F.cross_entropy), ("manual", manual, MF.cross_entropy)):
        per_sample[key] = vmap(grad(sample_loss(model, loss_fn)), in_dims=(None, 0, 0))(params_of(model), x, onehot)
    assert_close(per_sample["manual"], per_sample["native"])
    for n in range(x.shape[0]):  # the gradient of sample n alone, by manualconv's backward
        loss = manualconv.CrossEntropyLoss()(manual(x[n:n + 1]), labels[n:n + 1])
        alone = torch.autograd.grad(loss, list(manual.parameters()))
        for (name, _), g in zip(manual.named_parameters(), alone):
            assert_close(per_sample["manual"][name][n], g, msg=lambda m: f"{name}, sample {n}: {m}")


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_wrt_input_and_parameters(backend, transform):
    native, manual = pair(small_net)
    x = data(n=2)[0]
    results = {}
    for key, model in (("native", native), ("manual", manual)):
        params = params_of(model)
        results[key] = (transform(lambda x: functional_call(model, params, (x,)))(x),
                        transform(lambda p: functional_call(model, p, (x,)))(params))
    assert_close(results["manual"], results["native"])


def test_jvp_wrt_input_and_parameters(backend):
    native, manual = pair(small_net)
    x, labels, _ = data(n=3)
    torch.manual_seed(2)
    x_t = torch.randn_like(x)
    params_t = {name: torch.randn_like(p) for name, p in native.named_parameters()}
    results = {}
    for key, model, loss_fn in (("native", native, F.cross_entropy), ("manual", manual, MF.cross_entropy)):
        def loss(x, params):
            return loss_fn(functional_call(model, params, (x,)), labels)
        results[key] = jvp(loss, (x, params_of(model)), (x_t, params_t))
    assert_close(results["manual"], results["native"])


def test_hessian_wrt_parameters_and_input(backend):
    native, manual = pair(tiny_net)
    x, labels, _ = data(n=2, channels=2, size=6)
    results = {}
    for key, model, loss_fn in (("native", native, F.cross_entropy), ("manual", manual, MF.cross_entropy)):
        params = params_of(model)
        results[key] = (hessian(lambda p: loss_fn(functional_call(model, p, (x,)), labels))(params),
                        hessian(lambda x: loss_fn(functional_call(model, params, (x,)), labels))(x))
    assert_close(results["manual"], results["native"])


# ---- each op's vmap rule (every branch) and jvp rule against torch's -----------------------

def t(*size, dtype=torch.float64):
    return torch.randn(*size, dtype=dtype)


B = 3  # the mapped dimension's size


def op_cases():
    """(id, op name in F and MF, args, in_dims, kwargs). Mapped args carry B in dimension in_dims."""
    conv = dict(stride=2, padding=1, dilation=2, groups=2)
    x, w, b = (2, 4, 9, 9), (6, 2, 3, 3), (6,)
    cases = [
        ("conv2d-input", "conv2d", [t(B, *x), t(*w), t(*b)], (0, None, None), conv),
        ("conv2d-input-dim2", "conv2d", [t(2, 4, B, 9, 9), t(*w), t(*b)], (2, None, None), conv),
        ("conv2d-weight", "conv2d", [t(*x), t(B, *w), t(*b)], (None, 0, None), conv),
        ("conv2d-weight-groups1", "conv2d", [t(2, 4, 9, 9), t(5, B, 4, 3, 3), t(5)], (None, 1, None), dict(padding=1)),
        ("conv2d-input-weight-bias", "conv2d", [t(B, *x), t(B, *w), t(B, *b)], (0, 0, 0), conv),
        ("conv2d-bias", "conv2d", [t(*x), t(*w), t(*b, B)], (None, None, 1), conv),
        ("conv2d-unbatched", "conv2d", [t(B, 4, 9, 9), t(B, *w), None], (0, 0, None), conv),
        ("conv_transpose2d-input", "conv_transpose2d", [t(B, 2, 4, 5, 5), t(4, 3, 3, 3), t(6)], (0, None, None),
         dict(stride=2, padding=1, output_padding=1, groups=2)),
        ("conv_transpose2d-weight", "conv_transpose2d", [t(2, 4, 5, 5), t(B, 4, 3, 3, 3), t(B, 6)], (None, 0, 0),
         dict(stride=2, padding=1, output_padding=1, groups=2)),
        ("conv1d-both", "conv1d", [t(B, 2, 4, 11), t(B, 6, 2, 3), t(6)], (0, 0, None), dict(padding=2, groups=2)),
        ("max_pool2d", "max_pool2d", [t(2, B, 3, 9, 9)], (1,), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
        ("avg_pool2d", "avg_pool2d", [t(B, 2, 3, 9, 9)], (0,),
         dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
        ("adaptive_max_pool2d", "adaptive_max_pool2d", [t(B, 2, 3, 9, 7)], (0,), dict(output_size=(4, 3))),
        ("adaptive_avg_pool2d", "adaptive_avg_pool2d", [t(2, 3, 9, 7, B)], (4,), dict(output_size=(4, 3))),
        ("linear-input", "linear", [t(B, 4, 7), t(5, 7), t(5)], (0, None, None), {}),
        ("linear-weight-bias", "linear", [t(4, 7), t(B, 5, 7), t(B, 5)], (None, 0, 0), {}),
        ("linear-all", "linear", [t(4, B, 7), t(5, 7, B), t(5)], (1, 2, None), {}),
        ("relu", "relu", [t(B, 2, 3, 4)], (0,), {}),
        ("sigmoid", "sigmoid", [t(2, B, 3)], (1,), {}),
        ("tanh", "tanh", [t(2, 3, B)], (2,), {}),
    ]
    for reduction in ("none", "sum", "mean"):
        cases.append((f"cross_entropy-{reduction}", "cross_entropy",
                      [t(B, 4, 5), torch.softmax(t(B, 4, 5), -1)], (0, 0), dict(reduction=reduction, label_smoothing=0.1)))
    cases.append(("cross_entropy-index", "cross_entropy", [t(B, 4, 5), torch.tensor([0, 4, 2, 1])], (0, None), {}))
    # mapped class indices (DP-SGD's vmap(grad(loss)) over (sample, label) pairs), an ignored one too
    cases.append(("cross_entropy-index-mapped", "cross_entropy", [t(B, 4, 5), torch.tensor([[0, 4, 2, 1], [3, 3, 0, 2], [1, 0, 4, 4]])],
                  (0, 0), dict(label_smoothing=0.1)))
    cases.append(("cross_entropy-index-mapped-ignored", "cross_entropy", [t(4, 5, B), torch.tensor([[0, -100, 2], [1, 3, 3], [4, 4, -100], [2, 0, 1]])],
                  (2, 1), dict(reduction="mean")))
    # the activations, softmaxes and norms (elementwise rules, a shifted softmax dim, folded rows)
    for name, kwargs in (("gelu", {}), ("gelu", dict(approximate="tanh")), ("silu", {}), ("hardtanh", dict(min_val=-0.5)),
                         ("relu6", {}), ("hardswish", {}), ("hardsigmoid", {}), ("leaky_relu", dict(negative_slope=0.2)),
                         ("elu", dict(alpha=0.7))):
        cases.append((f"{name}-{len(cases)}", name, [3 * t(2, B, 3, 4)], (1,), kwargs))
    for name in ("softmax", "log_softmax"):
        cases.append((f"{name}-dim1", name, [t(2, 5, B)], (2,), dict(dim=1)))
        cases.append((f"{name}-dim-1", name, [t(B, 2, 5)], (0,), dict(dim=-1)))
    cases.append(("layer_norm", "layer_norm", [t(B, 2, 3, 4), (3, 4), t(3, 4), t(3, 4)], (0, None, None, None), {}))
    cases.append(("layer_norm-affine", "layer_norm", [t(2, B, 6), (6,), t(B, 6), t(6, B)], (1, None, 0, 1), {}))
    # batch norm: each mapped sample normalised with its own batch statistics (training), or
    # with the shared running statistics (eval); 2-D / 3-D inputs as BatchNorm1d's
    cases.append(("batch_norm-train", "batch_norm", [t(B, 4, 3, 5, 5), None, None, t(3), t(3)],
                  (0, None, None, None, None), dict(training=True)))
    cases.append(("batch_norm-train-affine", "batch_norm", [t(4, B, 3, 5, 5), None, None, t(B, 3), t(3, B)],
                  (1, None, None, 0, 1), dict(training=True)))
    cases.append(("batch_norm-train-1d", "batch_norm", [t(B, 6, 4), None, None, None, None],
                  (0, None, None, None, None), dict(training=True)))
    cases.append(("batch_norm-train-3d", "batch_norm", [t(5, 4, B, 7), None, None, t(4), None],
                  (2, None, None, None, None), dict(training=True)))
    cases.append(("batch_norm-eval", "batch_norm", [t(B, 4, 3, 5, 5), t(3), t(3).abs() + 0.5, t(3), t(3)],
                  (0, None, None, None, None), dict(training=False)))
    cases.append(("group_norm", "group_norm", [t(B, 2, 6, 3, 3), 3, t(6), t(6)], (0, None, None, None), {}))
    cases.append(("group_norm-affine", "group_norm", [t(B, 2, 6, 3, 3), 3, t(B, 6), t(B, 6)], (0, None, 0, 0), {}))
    return cases


CASES = op_cases()


def floating(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def call(namespace, name, kwargs):
    op = getattr(namespace, name)
    return lambda *args: op(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_vmap_rule_matches_torch(backend, case):
    _, name, args, in_dims, kwargs = case
    expected = vmap(call(F, name, kwargs), in_dims=in_dims)(*args)
    assert_close(vmap(call(MF, name, kwargs), in_dims=in_dims)(*args), expected)


JVP_CONSTANT_ARGS = {"batch_norm": (1, 2)}  # op → positions of arguments without a tangent


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_jvp_rule_matches_torch(backend, case):
    _, name, args, in_dims, kwargs = case
    args = [a if d is None else a.select(d, 0) for a, d in zip(args, in_dims)]  # one sample's arguments
    # batch norm's running statistics are buffers, held constant: torch refuses them a gradient
    # (reverse mode), manualconv gives them neither gradient nor tangent
    constant = JVP_CONSTANT_ARGS.get(name, ())
    varied = [floating(a) and i not in constant for i, a in enumerate(args)]
    primals = tuple(a for a, v in zip(args, varied) if v)
    others = [a for a, v in zip(args, varied) if not v]
    torch.manual_seed(3)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def with_primals(namespace):
        def f(*floats):
            it, rest = iter(floats), iter(others)
            full = [next(it) if v else next(rest) for v in varied]
            return getattr(namespace, name)(*full, **kwargs)
        return f
    assert_close(jvp(with_primals(MF), primals, tangents), jvp(with_primals(F), primals, tangents))


def test_max_pool_indices_under_vmap(backend):
    x = t(B, 2, 3, 8, 8)
    y, i = vmap(lambda x: MF.max_pool2d(x, 2, return_indices=True))(x)
    y_native, i_native = vmap(lambda x: F.max_pool2d(x, 2, return_indices=True))(x)
    assert_close(y, y_native)
    assert torch.equal(i, i_native)


def test_subsampling2d_vmap_and_jvp(backend):
    """No torch.nn twin: vmap (shared and per-sample β, b) against a loop over the samples, jvp
    against the double-backward jvp of torch.autograd.functional (which runs the derived backward)."""
    x, beta, bias = t(B, 2, 3, 8, 8), t(3), t(B, 3)
    op = lambda x, beta, bias: MF.subsampling2d(x, beta, bias, 2)  # noqa: E731
    assert_close(vmap(op, in_dims=(0, None, 0))(x, beta, bias),
                 torch.stack([op(x[n], beta, bias[n]) for n in range(B)]))
    assert_close(vmap(op, in_dims=(0, None, None))(x, beta, bias[0]),
                 torch.stack([op(x[n], beta, bias[0]) for n in range(B)]))
    primals, tangents = (x[0], beta, bias[0]), (t(2, 3, 8, 8), t(3), t(3))
    assert_close(jvp(op, primals, tangents)[1], torch.autograd.functional.jvp(op, primals, tangents)[1])


def test_bias_function_vmap_and_jvp(backend):
    from manualconv.autograd import BiasFunction
    x, bias = t(B, 2, 3, 4, 4), t(B, 3)
    expected = torch.stack([x[n] + bias[n].reshape(1, -1, 1, 1) for n in range(B)])
    assert_close(vmap(BiasFunction.apply)(x, bias), expected)
    assert_close(vmap(BiasFunction.apply, in_dims=(0, None))(x, bias[0]), x + bias[0].reshape(1, 1, -1, 1, 1))
    tangents = (t(2, 3, 4, 4), t(3))
    assert_close(jvp(BiasFunction.apply, (x[0], bias[0]), tangents)[1], tangents[0] + tangents[1].reshape(1, -1, 1, 1))


def test_nested_vmap_over_samples_and_weights(backend):
    """vmap(vmap(conv)): an outer mapped weight over an inner mapped input (two rules stacked)."""
    x, w = t(B, 2, 3, 6, 6), t(2, 4, 3, 3, 3)
    conv = lambda x, w: MF.conv2d(x, w, padding=1)  # noqa: E731
    native = lambda x, w: F.conv2d(x, w, padding=1)  # noqa: E731
    assert_close(vmap(vmap(conv, in_dims=(0, None)), in_dims=(None, 0))(x, w),
                 vmap(vmap(native, in_dims=(0, None)), in_dims=(None, 0))(x, w))


def test_per_sample_gradients_call_no_native_layer(backend):
    """vmap(grad) and jacfwd of the net dispatch no native convolution, pooling or unfold."""
    _, manual = pair(small_net)
    x, _, onehot = data(n=3)
    with RecordAtenOps() as record:
        vmap(grad(sample_loss(manual, MF.cross_entropy)), in_dims=(None, 0, 0))(params_of(manual), x, onehot)
        jacfwd(lambda x: manual(x))(x[:1])
    assert record.names, "nothing recorded"
    assert forbidden(record.names) == []


def test_per_sample_grads_helper(backend):
    """manualconv.per_sample.per_sample_grads (vmap(grad) in one call) equals torch.nn's per-sample gradients."""
    from manualconv.per_sample import per_sample_grads
    native, manual = pair(small_net)
    x, _, onehot = data(n=4)
    expected = vmap(grad(sample_loss(native, F.cross_entropy)), in_dims=(None, 0, 0))(params_of(native), x, onehot)
    assert_close(per_sample_grads(manual, MF.cross_entropy, x, onehot), expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_hessian_matches_torch(backend, training):
    """hessian = jacfwd(jacrev): BatchNormFunction's jvp rule differentiates its backward again."""
    torch.manual_seed(8)
    x, w, b = t(3, 2, 3, 3), t(2), t(2)
    stats = (None, None) if training else (t(2), t(2).abs() + 0.5)

    def loss(namespace):
        return lambda x_: namespace.batch_norm(x_, *stats, w, b, training=training).pow(3).sum()
    assert_close(hessian(loss(MF))(x), hessian(loss(F))(x))


def test_cross_entropy_target_out_of_range_under_vmap(backend):
    """The class-index check runs on every mapped sample's labels (torch's kernels check their
    real tensor too): IndexError naming the target, as outside vmap (torch raises a RuntimeError
    from its gather there)."""
    targets = torch.tensor([[0, 1], [2, 7]])
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        vmap(grad(lambda a, b: MF.cross_entropy(a, b)))(t(2, 2, 4), targets)


def _functions():
    from manualconv import autograd
    seen, stack = [], [autograd.Function]
    while stack:
        for sub in stack.pop().__subclasses__():
            seen.append(sub)
            stack.append(sub)
    return seen


def test_forward_signatures_bind_as_inspect_does():
    """Every Function's forward carries the signature Function.apply binds (autograd.py's fast
    bind): a call passing every parameter positionally binds to the same args and kwargs as
    inspect's general Signature.bind + apply_defaults, and any other call falls back to it."""
    import inspect

    functions = _functions()
    assert len(functions) > 30, [f.__name__ for f in functions]
    for function in functions:
        signature = function.forward.__signature__
        plain = inspect.Signature(list(signature.parameters.values()))
        names = list(signature.parameters)
        positional = tuple(object() for _ in names)
        bound, expected = signature.bind(*positional), plain.bind(*positional)
        bound.apply_defaults(), expected.apply_defaults()
        assert (bound.args, bound.kwargs) == (expected.args, expected.kwargs), function.__name__
        if len(names) > 1:  # the last parameter by keyword: inspect's own binding
            bound = signature.bind(*positional[:-1], **{names[-1]: positional[-1]})
            assert bound.args == positional and bound.kwargs == {}, function.__name__
            with pytest.raises(TypeError):
                signature.bind(*positional, **{names[0]: positional[0]})


_W = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
_G = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
# each: f(functional, x) with x of shape (4, 3, 6, 6), float64; a product with x where the layer
# is piecewise linear, so its Hessian is not zero
FORWARD_OVER_REVERSE = {
    "conv2d": lambda f, x: f.conv2d(x, _W, None, padding=1) ** 2,
    "max_pool2d": lambda f, x: f.max_pool2d(x * x, 2),
    "avg_pool2d": lambda f, x: f.avg_pool2d(x * x, 3, 1, 1),
    "adaptive_max_pool2d": lambda f, x: f.adaptive_max_pool2d(x * x, 2),
    "adaptive_avg_pool2d": lambda f, x: f.adaptive_avg_pool2d(x * x, 2),
    "relu": lambda f, x: f.relu(x) * x,
    "gelu": lambda f, x: f.gelu(x),
    "silu": lambda f, x: f.silu(x),
    "batch_norm": lambda f, x: f.batch_norm(x, None, None, _G, -_G, True) * x,
    "layer_norm": lambda f, x: f.layer_norm(x, (6, 6)) * x,
    "group_norm": lambda f, x: f.group_norm(x, 3, _G, _G) * x,
    "log_softmax": lambda f, x: f.log_softmax(x, 1) * x,
}


@pytest.mark.parametrize("layer", list(FORWARD_OVER_REVERSE))
def test_forward_over_reverse_through_the_backward(layer, backend):
    """A Hessian-vector product by forward-mode AD over a backward pass (torch.autograd.forward_ad,
    no torch.func) equals torch's reverse-over-reverse one in float64 (torch cannot run forward AD
    through silu's or group norm's backward). A backward that calls its kernel directly while a
    dual level is open drops the tangent (ReLU's, batch norm's and layer norm's did: silently
    wrong products); autograd.differentiated_again keeps them in differentiable code."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=gen)
    tangent = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    call = FORWARD_OVER_REVERSE[layer]
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.clone().requires_grad_(), tangent)
        (g,) = torch.autograd.grad((call(MF, xd) ** 2).sum(), xd)
        ours = fwAD.unpack_dual(g).tangent
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((call(F, xr) ** 2).sum(), xr, create_graph=True)
    (expected,) = torch.autograd.grad((g * tangent).sum(), xr)
    assert ours is not None
    # float64 sums of a few hundred terms, two derivative passes: far below 1e-9 of the scale
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


def test_function_backward_replaced_after_definition_runs_in_eager_and_under_torch_func(monkeypatch):
    """A Function's apply takes its eager ctx-first twin outside torch.func and torch's own apply
    under it (autograd.py, Function): a backward replaced on the class later (a researcher's
    variant) runs on both paths, and the eager node is still the Function's (name, module)."""
    from manualconv.autograd import ReLUFunction
    x = torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = ReLUFunction.apply(x, "reference")
    assert type(y.grad_fn).__name__ == "ReLUFunctionBackward"
    assert y.grad_fn._forward_cls.__module__ == "manualconv.autograd"
    original = ReLUFunction.backward
    monkeypatch.setattr(ReLUFunction, "backward", staticmethod(
        lambda ctx, delta: (2 * original(ctx, delta)[0], None)))
    (eager,) = torch.autograd.grad(ReLUFunction.apply(x, "reference").sum(), x)
    assert torch.equal(eager, torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64))
    transformed = grad(lambda t: ReLUFunction.apply(t, "reference").sum())(x.detach())
    assert torch.equal(transformed, eager)
