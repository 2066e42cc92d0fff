"""The native twin as the oracle: exact values (float64) and rigorous error bounds.

Every output and gradient entry of the bounded ops (records with ``bound`` set) is a sum of at
most n products (n = the record's reduction_length). Computed in float32 in any order, such a
sum has an error of at most γ_n·Σ|terms| ≈ n·ε·Σ|terms| (ε = 2⁻²⁴, Higham, "Accuracy and
Stability of Numerical Algorithms", §3.1). For an op linear in each argument (bound='linear'),
Σ|terms| is the same op applied to |inputs| and |δ|, so it is computed by torch itself in
float64; for a max-like op (bound='max') the output is exact and the gradients are sums of
routed deltas, bounded by |δ| routed alike. Any indexing mistake gives errors of the order of
the values themselves, far above the bound.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from cases import Case, call, record_of

EPS32 = torch.finfo(torch.float32).eps / 2  # unit roundoff 2⁻²⁴
UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def output_of(result):
    """The differentiable output (max_pool2d with return_indices returns (y, indices))."""
    return result[0] if isinstance(result, tuple) else result


def run_with_grads(case: Case, lib: str, tensors: List[torch.Tensor], grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward and backward of the case; returns output, indices (max pool) and the gradient of
    every floating-point argument, named grad_<argument name in the record>."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    result = call(case, lib, *leaves)
    out = output_of(result)
    names, differentiable = zip(*[(name, t) for name, t in zip(record_of(case).args, leaves) if t.requires_grad])
    grads = torch.autograd.grad(out, differentiable, grad_output)
    named = {"output": out.detach()}
    if isinstance(result, tuple):
        named["indices"] = result[1]
    named.update({f"grad_{name}": g for name, g in zip(names, grads)})
    return named


def exact_and_magnitude(case: Case, tensors: List[torch.Tensor], grad_output: torch.Tensor):
    """The native twin's float64 results on the data (on the CPU) and the Σ|terms| of each."""
    wide = [t.double() for t in tensors]
    exact = run_with_grads(case, "native", wide, grad_output.double())
    if record_of(case).bound == "max":
        # the max is exact; gradients are sums of routed deltas: bound them with |δ| routed alike
        magnitude = run_with_grads(case, "native", wide, grad_output.double().abs())
        magnitude["output"] = exact["output"].abs()
    else:
        magnitude = run_with_grads(case, "native", [t.abs() for t in wide], grad_output.double().abs())
    return exact, magnitude


def sum_error_bound(n: int, dtype: torch.dtype, magnitude: torch.Tensor, roundings: int = 4) -> torch.Tensor:
    """Error bound of a sum of n terms with absolute sum `magnitude`, computed in dtype.

    float32/float64: n·ε·Σ|terms| (×2 in float64, where the float64 oracle has an error of the
    same order). float16/bfloat16: sums run in float32 (n·ε32·Σ|terms|) and each rounding to the
    format adds at most u·Σ|terms|: `roundings` of them on any path."""
    if dtype == torch.float64:
        return 2 * n * UNIT_ROUNDOFF[dtype] * magnitude
    if dtype == torch.float32:
        return n * EPS32 * magnitude
    return (n * EPS32 + roundings * UNIT_ROUNDOFF[dtype]) * magnitude


def error_bound(case: Case, dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    """Error bound of one result of the case whose terms have absolute sum `magnitude`. In
    float16/bfloat16: at most 4 roundings to the format on any path (a GEMM's output, a product
    or bias added elementwise, the final result), or, for a max-like op's atomicAdd scatter, one
    per routed delta (at most n)."""
    n = record_of(case).reduction_length(case)
    return sum_error_bound(n, dtype, magnitude, roundings=n if record_of(case).bound == "max" else 4)


def exact_and_bound(case: Case, tensors32: List[torch.Tensor], grad_output32: torch.Tensor):
    """The native twin's float64 results on the float32 data, and the float32 error bound of each."""
    exact, magnitude = exact_and_magnitude(case, tensors32, grad_output32)
    bound = {k: error_bound(case, torch.float32, magnitude[k]) for k in exact if k != "indices"}
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
