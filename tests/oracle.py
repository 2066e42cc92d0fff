"""torch.nn as the oracle: exact values (float64) and rigorous float32 error bounds.

Every output and gradient entry of these ops is a sum of at most n products (n =
cases.reduction_length). Computed in float32 in any order, such a sum has an error of at most
γ_n·Σ|terms| ≈ n·ε·Σ|terms| (ε = 2⁻²⁴, Higham, "Accuracy and Stability of Numerical
Algorithms", §3.1). Σ|terms| is the same op applied to |inputs| and |δ| (all these ops are
linear in each argument), so the bound is computed by torch itself in float64. Any indexing
mistake gives errors of the order of the values themselves, far above the bound.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from cases import MAX_OPS, Case, call, reduction_length

EPS32 = torch.finfo(torch.float32).eps / 2  # unit roundoff 2⁻²⁴


def output_of(result):
    """The differentiable output (max_pool2d with return_indices returns (y, indices))."""
    return result[0] if isinstance(result, tuple) else result


def run_with_grads(case: Case, lib: str, tensors: List[torch.Tensor], grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward and backward of the case; returns output, indices (max pool) and every gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    result = call(case, lib, *leaves)
    out = output_of(result)
    differentiable = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, differentiable, grad_output)
    named = {"output": out.detach()}
    if isinstance(result, tuple):
        named["indices"] = result[1]
    names = ("input", "target") if case.op == "cross_entropy" else ("input", "weight", "bias")
    named.update({f"grad_{name}": g for name, g in zip(names, grads)})
    return named


def exact_and_bound(case: Case, tensors32: List[torch.Tensor], grad_output32: torch.Tensor):
    """torch.nn's float64 results on the float32 data, and the float32 error bound of each."""
    wide = [t.double() for t in tensors32]
    exact = run_with_grads(case, "native", wide, grad_output32.double())
    n = reduction_length(case)
    if case.op in MAX_OPS:
        # the max is exact; gradients are sums of routed deltas: bound them with |δ| routed alike
        magnitude = run_with_grads(case, "native", wide, grad_output32.double().abs())
        magnitude["output"] = exact["output"].abs()
    else:
        magnitude = run_with_grads(case, "native", [t.abs() for t in wide], grad_output32.double().abs())
    bound = {k: n * EPS32 * magnitude[k] for k in exact if k != "indices"}
    return exact, bound


def assert_within(case: Case, what: str, actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    assert actual.shape == exact.shape, f"{case}: {what} has size {list(actual.shape)}, native {list(exact.shape)}"
    actual = actual.double()
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan), f"{case}: {what} has NaNs where native has none, or the reverse"
    error = (actual - exact).abs().masked_fill(nan, 0)
    excess = error - bound.masked_fill(nan, 0)
    if (excess > 0).any():
        worst = int(excess.argmax())
        raise AssertionError(
            f"{case}: {what} differs from native by {error.flatten()[worst].item():.3e} at flat index "
            f"{worst}, above its float32 bound {bound.flatten()[worst].item():.3e}"
        )
