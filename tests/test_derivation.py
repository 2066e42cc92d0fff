"""docs/derivation.md is executable: its worked examples and its citations are checked here.

The document's example matrices are fenced blocks tagged ``example name=EXAMPLE.QUANTITY``
(a worked entry is ``EXAMPLE.QUANTITY[i,j]``, holding arithmetic such as ``2·1 + (−1)·0 = 2``).
Every number is recomputed with manualconv's two backends ('reference' and 'cpp') and with
torch.nn; every worked entry's arithmetic is evaluated, its terms compared with the formula,
and its result with the matrix entry; every ``path::name`` the document cites must exist.
A number the code disagrees with, or a renamed function or test, fails here.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest
import torch
import torch.nn.functional as F

import manualconv
import manualconv.functional as MF
from manualconv import ops, reference

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "derivation.md"
IMPLEMENTATIONS = ("reference", "cpp", "torch")  # manualconv's two backends, and torch.nn
CONV_EXAMPLES = ("conv-s1", "conv-s2")
EXAMPLES = {"conv-s1", "conv-s2", "maxpool", "avgpool", "softmax-ce"}
EXAMPLES.add("batchnorm")  # section 16 (normalisation)
EXAMPLES |= {"activations", "softmax"}  # section 17 (activations)
EXAMPLES.add("winograd")  # section 18 (Winograd F(2×2, 3×3))
EXAMPLES.add("winograd4x4")  # section 18 (Winograd F(4×4, 3×3))


# ---------------------------------------------------------------------------------------------
# Reading the document


FENCE = re.compile(r"^```example[ \t]+name=(?P<name>\S+)(?P<flags>[^\n]*)\n(?P<body>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
NAME = re.compile(r"^(?P<example>[a-z0-9-]+)\.(?P<quantity>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<i>\d+),(?P<j>\d+)\])?$")
UNICODE_ARITHMETIC = str.maketrans({"−": "-", "·": "*", "×": "*"})


@dataclass(frozen=True)
class Block:
    """One fenced example block: a matrix (entry is None) or a worked entry's arithmetic."""

    example: str
    quantity: str
    entry: Optional[Tuple[int, int]]
    rounded: bool
    body: str

    @property
    def name(self) -> str:
        return f"{self.example}.{self.quantity}" + ("" if self.entry is None else f"[{self.entry[0]},{self.entry[1]}]")


def parse_blocks(text: str) -> List[Block]:
    """Every ``example`` block of a markdown text, in order; names must be well formed and unique."""
    blocks, seen = [], set()
    for match in FENCE.finditer(text):
        name = NAME.match(match["name"])
        if name is None:
            raise ValueError(f"bad example block name {match['name']!r} (expected EXAMPLE.QUANTITY or EXAMPLE.QUANTITY[i,j])")
        flags = match["flags"].split()
        if set(flags) - {"rounded"}:
            raise ValueError(f"example block {match['name']}: unknown flags {flags}")
        entry = None if name["i"] is None else (int(name["i"]), int(name["j"]))
        block = Block(name["example"], name["quantity"], entry, "rounded" in flags, match["body"])
        if block.name in seen:
            raise ValueError(f"example block {block.name} appears twice")
        seen.add(block.name)
        blocks.append(block)
    return blocks


def parse_matrix(body: str) -> Tuple[torch.Tensor, int]:
    """Whitespace-separated rows of numbers → (float64 matrix, most decimals printed in it)."""
    rows = [line.translate(UNICODE_ARITHMETIC).split() for line in body.splitlines() if line.strip()]
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError(f"not a rectangular matrix: {body!r}")
    try:
        values = [[float(word) for word in row] for row in rows]
    except ValueError as error:
        raise ValueError(f"not a matrix of numbers: {body!r}") from error
    decimals = max((len(word.split(".")[1]) if "." in word else 0) for row in rows for word in row)
    return torch.tensor(values, dtype=torch.float64), decimals


class Document:
    """The document's matrices, with a record of which ones were read (see
    test_every_example_number_is_checked)."""

    def __init__(self, text: str):
        blocks = parse_blocks(text)
        self.matrices = {(b.example, b.quantity): b for b in blocks if b.entry is None}
        self.worked = [b for b in blocks if b.entry is not None]
        self.read: Set[Tuple[str, str]] = set()

    def value(self, example: str, quantity: str) -> torch.Tensor:
        """The matrix EXAMPLE.QUANTITY as an (H, W) float64 tensor."""
        if (example, quantity) not in self.matrices:
            raise KeyError(f"docs/derivation.md has no example block {example}.{quantity}")
        self.read.add((example, quantity))
        return parse_matrix(self.matrices[example, quantity].body)[0]

    def integer(self, example: str, quantity: str) -> int:
        return int(self.value(example, quantity).item())

    def tolerance(self, example: str, quantity: str) -> float:
        """0 for exact blocks; half a unit of the last printed digit for ``rounded`` ones."""
        block = self.matrices[example, quantity]
        return 0.5 * 10.0 ** -parse_matrix(block.body)[1] if block.rounded else 0.0

    def assert_matches(self, example: str, quantity: str, actual: torch.Tensor, by: str) -> None:
        """The document's EXAMPLE.QUANTITY equals ``actual`` (computed ``by`` something)."""
        expected = self.value(example, quantity)
        actual = actual.detach().to(torch.float64)
        assert tuple(actual.shape) == tuple(expected.shape), (
            f"{example}.{quantity}: the document has size {list(expected.shape)}, {by} gives {list(actual.shape)}")
        error = (actual - expected).abs().max().item()
        assert error <= self.tolerance(example, quantity), (
            f"{example}.{quantity}: the document says\n{expected}\nbut {by} gives\n{actual}")


def load() -> Document:
    return Document(DOC.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# The three implementations


@contextlib.contextmanager
def implementation(name: str):
    """manualconv.functional on one backend, or torch.nn.functional (the same signatures)."""
    if name == "torch":
        yield F
        return
    if name == "cpp":
        assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    with manualconv.use_backend(name):
        yield MF


def correlate(name: str, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Plain stride-1 cross-correlation x ⋆ kernel of (H, W) matrices, by one implementation's
    own forward kernel (no autograd involved)."""
    x4, k4 = x[None, None], kernel[None, None]
    if name == "reference":
        return reference.correlate2d(x4, k4, (1, 1), (1, 1), 1)[0, 0]
    if name == "cpp":
        assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
        return torch.ops.manualconv.conv2d_forward(x4, k4, None, [1, 1], [0, 0], [1, 1], 1)[0, 0]
    return F.conv2d(x4, k4)[0, 0]


def leaf(matrix: torch.Tensor) -> torch.Tensor:
    """An (H, W) matrix as a (1, 1, H, W) tensor that collects its gradient."""
    return matrix[None, None].clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The checks, one per example (each reads the document through Document.value)


def conv_given(doc: Document, example: str):
    """x, W, b of the conv examples (written once, in example 1), and this example's stride and δ."""
    x, weight, bias = (doc.value("conv-s1", q) for q in ("x", "W", "b"))
    return x, weight, bias.reshape(1), doc.integer(example, "stride"), doc.value(example, "delta")


def check_conv_example(doc: Document, example: str, impl: str) -> None:
    """Forward, δx, ∂J/∂W, ∂J/∂b of the layer; and δx as the full correlation of the document's
    padded δ with its rotated kernel (section 2)."""
    x, weight, bias, stride, delta = conv_given(doc, example)
    xl, wl, bl = leaf(x), leaf(weight), bias.clone().requires_grad_(True)
    with implementation(impl) as lib:
        y = lib.conv2d(xl, wl.reshape(1, 1, *weight.shape), bl, stride=stride)
        y.backward(delta[None, None])
    by = f"{impl} conv2d"
    doc.assert_matches(example, "y", y[0, 0], by)
    doc.assert_matches(example, "grad_x", xl.grad[0, 0], by)
    doc.assert_matches(example, "grad_W", wl.grad[0, 0], by)
    doc.assert_matches(example, "grad_b", bl.grad.reshape(1, 1), by)
    rotated = doc.value("conv-s1", "W_rot180")
    full = correlate(impl, doc.value(example, "delta_padded"), rotated)
    doc.assert_matches(example, "grad_x", full, f"{impl}: delta_padded ⋆ W_rot180")


def full_padding(weight: torch.Tensor, input_size: int, output_size: int, stride: int,
                 padding: int = 0, dilation: int = 1) -> Tuple[int, int]:
    """Section 3: d(k−1) − p zeros before δ↑, and r more after (the rows the forward skipped)."""
    k = weight.shape[-1]
    before = dilation * (k - 1) - padding
    skipped = (input_size + 2 * padding - dilation * (k - 1) - 1) % stride
    assert output_size == (input_size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return before, before + skipped


def zero_insert_by_slicing(delta: torch.Tensor, stride: int) -> torch.Tensor:
    """δ↑ written directly from its definition: δ at every s-th position, zeros between."""
    h, w = delta.shape
    spread = delta.new_zeros((h - 1) * stride + 1, (w - 1) * stride + 1)
    spread[::stride, ::stride] = delta
    return spread


def check_conv_steps(doc: Document, example: str) -> None:
    """The intermediate matrices of sections 2–3 — rot180(W), δ↑, the padded δ — against the
    reference backend's own helpers and against their definitions in plain torch."""
    x, weight, _, stride, delta = conv_given(doc, example)
    w4 = weight[None, None]
    doc.assert_matches("conv-s1", "W_rot180", reference.rotate180_transposed(w4, 1)[0, 0], "reference.rotate180_transposed")
    doc.assert_matches("conv-s1", "W_rot180", weight.flip(0, 1), "torch.flip")
    spread = delta
    if stride > 1:
        spread = reference.dilate_with_zeros(delta[None, None], (stride, stride))[0, 0]
        doc.assert_matches(example, "delta_zero_inserted", spread, "reference.dilate_with_zeros")
        doc.assert_matches(example, "delta_zero_inserted", zero_insert_by_slicing(delta, stride), "slicing")
    before, after = full_padding(weight, x.shape[-1], delta.shape[-1], stride)
    doc.assert_matches(example, "delta_padded", F.pad(spread, (before, after, before, after)), "torch.nn.functional.pad")


def check_transposed_conv(doc: Document, example: str, impl: str) -> None:
    """Section 13: conv_transpose(δ, W, stride) is the example's δx."""
    _, weight, _, stride, delta = conv_given(doc, example)
    with implementation(impl) as lib:
        y = lib.conv_transpose2d(delta[None, None], weight[None, None], stride=stride)
    doc.assert_matches(example, "grad_x", y[0, 0], f"{impl} conv_transpose2d")


def check_max_pool_example(doc: Document, impl: str) -> None:
    x, kernel, delta = doc.value("maxpool", "x"), doc.integer("maxpool", "kernel"), doc.value("maxpool", "delta")
    xl = leaf(x)
    with implementation(impl) as lib:
        y, indices = lib.max_pool2d(xl, kernel, return_indices=True)
        y.backward(delta[None, None])
    assert indices.dtype == torch.int64, f"{impl}: indices have dtype {indices.dtype}"
    doc.assert_matches("maxpool", "y", y[0, 0], f"{impl} max_pool2d")
    doc.assert_matches("maxpool", "indices", indices[0, 0], f"{impl} max_pool2d")
    doc.assert_matches("maxpool", "grad_x", xl.grad[0, 0], f"{impl} max_pool2d backward")


def check_avg_pool_example(doc: Document, impl: str) -> None:
    x, kernel, delta = doc.value("maxpool", "x"), doc.integer("avgpool", "kernel"), doc.value("avgpool", "delta")
    xl = leaf(x)
    with implementation(impl) as lib:
        y = lib.avg_pool2d(xl, kernel)
        y.backward(delta[None, None])
    doc.assert_matches("avgpool", "y", y[0, 0], f"{impl} avg_pool2d")
    doc.assert_matches("avgpool", "grad_x", xl.grad[0, 0], f"{impl} avg_pool2d backward")


def check_cross_entropy_example(doc: Document, impl: str) -> None:
    """J, δ = ∂J/∂z, and softmax(z) = δ + onehot(t) (section 15) with reduction='sum'."""
    z = doc.value("softmax-ce", "z").clone().requires_grad_(True)
    target = doc.value("softmax-ce", "target").reshape(-1).long()
    with implementation(impl) as lib:
        loss = lib.cross_entropy(z, target, reduction="sum")
        loss.backward()
    doc.assert_matches("softmax-ce", "loss", loss.reshape(1, 1), f"{impl} cross_entropy")
    doc.assert_matches("softmax-ce", "delta", z.grad, f"{impl} cross_entropy backward")
    onehot = F.one_hot(target, z.shape[1]).to(z.dtype)
    doc.assert_matches("softmax-ce", "softmax", z.grad + onehot, f"{impl}: delta + onehot(target)")
    doc.assert_matches("softmax-ce", "softmax", torch.softmax(z, dim=1), "torch.softmax")


# ---------------------------------------------------------------------------------------------
# Worked entries: arithmetic, terms and result


def evaluate_terms(expression: str) -> List[Tuple]:
    """'2·1 + (−1)·0 + 4/4' → [(2, 1), (-1, 0), (4, '/', 4)]: the terms of a sum, each a product
    of numbers (or one quotient). Only numbers, + − · / and parentheses around numbers."""
    tree = ast.parse(expression.translate(UNICODE_ARITHMETIC).strip(), mode="eval").body

    def number(node) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -number(node.operand)
        raise ValueError(f"not a number: {ast.unparse(node)!r} in {expression!r}")

    def factors(node) -> Tuple:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return factors(node.left) + factors(node.right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return (number(node.left), "/", number(node.right))
        return (number(node),)

    def terms(node) -> List[Tuple]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return terms(node.left) + terms(node.right)
        return [factors(node)]

    return terms(tree)


def term_value(term: Tuple) -> float:
    if len(term) == 3 and term[1] == "/":
        return term[0] / term[2]
    product = 1.0
    for factor in term:
        product *= factor
    return product


def formula_terms(doc: Document, block: Block) -> List[Tuple]:
    """The terms the derivation prescribes for a worked entry, built from the document's own
    matrices: the forward sum (section 1), the full correlation (2), the weight correlation (6),
    the average-pool share (9)."""
    i, j = block.entry
    if block.example in CONV_EXAMPLES:
        x, weight, bias, stride, delta = conv_given(doc, block.example)
        k = weight.shape[0]
        taps = [(a, b) for a in range(k) for b in range(k)]
        if block.quantity == "y":
            return [(bias.item(),)] + [(weight[a, b].item(), x[i * stride + a, j * stride + b].item()) for a, b in taps]
        if block.quantity == "grad_x":
            padded, rotated = doc.value(block.example, "delta_padded"), doc.value("conv-s1", "W_rot180")
            return [(rotated[a, b].item(), padded[i + a, j + b].item()) for a, b in taps]
        if block.quantity == "grad_W":
            return [(delta[m, n].item(), x[m * stride + i, n * stride + j].item())
                    for m in range(delta.shape[0]) for n in range(delta.shape[1])]
    if block.example == "avgpool" and block.quantity == "grad_x":
        k = doc.integer("avgpool", "kernel")
        return [(doc.value("avgpool", "delta")[i // k, j // k].item(), "/", float(k * k))]
    if block.example == "batchnorm":  # section 16 (normalisation)
        return batch_norm_formula_terms(doc, block)
    if block.example in ("activations", "softmax"):  # section 17 (activations)
        return activation_formula_terms(doc, block)
    if block.example == "winograd":  # section 18 (Winograd)
        return winograd_formula_terms(doc, block)
    raise AssertionError(f"no formula known for the worked entry {block.name}")


def check_worked_entry(doc: Document, block: Block) -> None:
    """'terms = result': the terms are the formula's, they add up to the result, and the result
    is the matrix's entry."""
    sides = block.body.strip().split("=")
    assert len(sides) == 2, f"{block.name}: expected 'terms = result', got {block.body!r}"
    terms, (result,) = evaluate_terms(sides[0]), evaluate_terms(sides[1])
    expected = formula_terms(doc, block)
    assert terms == expected, f"{block.name}: the document's terms {terms} are not the formula's {expected}"
    total = sum(term_value(t) for t in terms)
    assert total == term_value(result), f"{block.name}: {sides[0].strip()} is {total}, not {sides[1].strip()}"
    entry = doc.value(block.example, block.quantity)[block.entry]
    assert entry.item() == total, f"{block.name}: the worked result {total} is not the matrix entry {entry.item()}"


def check_everything(doc: Document) -> None:
    """Every check of this file, in one go (used to prove that they read every block)."""
    for impl in IMPLEMENTATIONS:
        for example in CONV_EXAMPLES:
            check_conv_example(doc, example, impl)
            check_transposed_conv(doc, example, impl)
        check_max_pool_example(doc, impl)
        check_avg_pool_example(doc, impl)
        check_cross_entropy_example(doc, impl)
        check_batch_norm_example(doc, impl)  # section 16 (normalisation)
        check_activations_example(doc, impl)  # section 17 (activations)
        check_winograd_example(doc, impl)  # section 18 (Winograd)
        check_winograd4x4_example(doc, impl)  # section 18 (F(4×4))
    for example in CONV_EXAMPLES:
        check_conv_steps(doc, example)
    for block in doc.worked:
        check_worked_entry(doc, block)


# ---------------------------------------------------------------------------------------------
# Citations


CITATION = re.compile(r"`((?:manualconv|csrc|tests)/[\w/]+\.(?:py|cpp|h))::([\w.]+)`")
PATH = re.compile(r"`((?:manualconv|csrc|tests|docs)/[\w/.-]+\.\w+)`")


def python_name_exists(path: Path, name: str) -> bool:
    """manualconv: import the module and follow the dotted name. tests: a top-level def or class
    of the file (Class.method for methods), found without importing it."""
    relative = path.relative_to(REPO).with_suffix("")
    if relative.parts[0] == "manualconv":
        obj = importlib.import_module(".".join(relative.parts))
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    scope = ast.parse(path.read_text(encoding="utf-8")).body
    for part in name.split("."):
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        if not found:
            return False
        scope = found[0].body
    return True


def cpp_name_exists(path: Path, name: str) -> bool:
    """A definition in the file: a line at column 0 (not a comment) declaring ``name(``."""
    pattern = re.compile(r"^(?!//|#|\s)[^;(]*\b" + re.escape(name) + r"\s*\(", re.MULTILINE)
    return pattern.search(path.read_text(encoding="utf-8")) is not None


def missing_citations(text: str) -> List[str]:
    """Every `path::name` and `path` cited in ``text`` that does not exist."""
    missing = []
    for relative, name in CITATION.findall(text):
        path = REPO / relative
        if not path.is_file():
            exists = False
        elif path.suffix == ".py":
            exists = python_name_exists(path, name)
        else:
            exists = cpp_name_exists(path, name)
        if not exists:
            missing.append(f"{relative}::{name}")
    missing += [relative for relative in PATH.findall(text) if not (REPO / relative).is_file()]
    return missing


def formula_sections(text: str) -> Dict[str, str]:
    """The numbered sections ('## 3. Stride is zero insertion'), title → body."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    sections = {}
    for part in parts:
        title, _, body = part.partition("\n")
        if re.match(r"\d+\. ", title):
            sections[title] = body
    return sections


# ---------------------------------------------------------------------------------------------
# Tests


def test_document_has_every_example():
    doc = load()
    examples = {example for example, _ in doc.matrices} | {b.example for b in doc.worked}
    assert examples == EXAMPLES, f"examples in the document {sorted(examples)}, tested here {sorted(EXAMPLES)}"
    assert len(doc.worked) >= 5, "the document lost its worked entries"


def test_every_example_number_is_checked():
    """Running all the checks reads every matrix of the document, so no number is unchecked."""
    doc = load()
    check_everything(doc)
    unread = sorted(f"{e}.{q}" for e, q in set(doc.matrices) - doc.read)
    assert not unread, f"example blocks no test checks: {unread}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("example", CONV_EXAMPLES)
def test_conv_example(example, impl):
    check_conv_example(load(), example, impl)


@pytest.mark.parametrize("example", CONV_EXAMPLES)
def test_conv_example_steps(example):
    check_conv_steps(load(), example)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("example", CONV_EXAMPLES)
def test_transposed_conv_is_the_delta_recursion(example, impl):
    check_transposed_conv(load(), example, impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_pool_example(impl):
    check_max_pool_example(load(), impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_avg_pool_example(impl):
    check_avg_pool_example(load(), impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cross_entropy_example(impl):
    check_cross_entropy_example(load(), impl)


def test_worked_entries():
    doc = load()
    for block in doc.worked:
        check_worked_entry(doc, block)


def test_a_wrong_number_is_caught():
    """The checks fail on a document whose numbers are off by one entry or one term."""
    text = DOC.read_text(encoding="utf-8")
    wrong_matrix = Document(text.replace("```example name=conv-s1.grad_W\n1 7\n", "```example name=conv-s1.grad_W\n1 8\n"))
    with pytest.raises(AssertionError, match="conv-s1.grad_W"):
        check_conv_example(wrong_matrix, "conv-s1", "reference")
    wrong_term = Document(text.replace("1 + 1·1 + 0·2 + (−1)·0 + 2·1 = 4", "1 + 1·1 + 0·2 + 2·1 + (−1)·0 = 4"))
    with pytest.raises(AssertionError, match="not the formula's"):
        check_worked_entry(wrong_term, next(b for b in wrong_term.worked if b.name == "conv-s1.y[0,0]"))


def test_parser_rejects_malformed_blocks():
    with pytest.raises(ValueError, match="rectangular"):
        parse_matrix("1 2\n3\n")
    with pytest.raises(ValueError, match="numbers"):
        parse_matrix("1 x\n")
    with pytest.raises(ValueError, match="twice"):
        parse_blocks("```example name=a.x\n1\n```\n```example name=a.x\n2\n```\n")
    with pytest.raises(ValueError, match="bad example block name"):
        parse_blocks("```example name=no_quantity\n1\n```\n")


def test_cited_names_exist():
    text = DOC.read_text(encoding="utf-8")
    assert len(CITATION.findall(text)) >= 60, "the document cites far fewer functions and tests than it should"
    assert missing_citations(text) == []


def test_citation_checker_rejects_unknown_names():
    bogus = ("`manualconv/reference.py::no_such_function` `manualconv/autograd.py::Conv2dFunction.no_such_method` "
             "`csrc/conv2d.cpp::no_such_kernel` `tests/test_ops.py::test_no_such_test` "
             "`manualconv/no_such_file.py::x` `docs/no_such_file.md` `manualconv/reference.py::conv2d_grad_input`")
    assert missing_citations(bogus) == [
        "manualconv/reference.py::no_such_function", "manualconv/autograd.py::Conv2dFunction.no_such_method",
        "csrc/conv2d.cpp::no_such_kernel", "tests/test_ops.py::test_no_such_test",
        "manualconv/no_such_file.py::x", "docs/no_such_file.md",
    ]


def test_every_formula_names_its_code_and_tests():
    """Each numbered section cites a manualconv function, a test, and a C++ kernel (or says
    there is none)."""
    sections = formula_sections(DOC.read_text(encoding="utf-8"))
    assert len(sections) >= 15, sorted(sections)
    for title, body in sections.items():
        cited = [path for path, _ in CITATION.findall(body)]
        assert any(p.startswith("manualconv/") for p in cited), f"section '{title}' cites no manualconv function"
        assert any(p.startswith("tests/") for p in cited), f"section '{title}' cites no test"
        assert any(p.startswith("csrc/") for p in cited) or "No C++ kernel" in body, (
            f"section '{title}' names no C++ kernel and does not say there is none")


# ---------------------------------------------------------------------------------------------
# Section 16: normalisation (batch norm's worked example)


def batch_norm_given(doc: Document):
    """x as a (1, 1, H, W) map, γ, β, ε and δ of the batch-norm example."""
    x = doc.value("batchnorm", "x")
    gamma, beta = doc.value("batchnorm", "gamma").reshape(1), doc.value("batchnorm", "beta").reshape(1)
    return x, gamma, beta, doc.value("batchnorm", "eps").item(), doc.value("batchnorm", "delta")


def check_batch_norm_example(doc: Document, impl: str) -> None:
    """Training-mode batch norm of one channel: y, δx, ∂J/∂γ, ∂J/∂β and the running statistics;
    x̂ and σ against their definitions."""
    x, gamma, beta, eps, delta = batch_norm_given(doc)
    xl, gl, bl = leaf(x), gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    running_mean, running_var = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    with implementation(impl) as lib:
        y = lib.batch_norm(xl, running_mean, running_var, gl, bl, training=True, momentum=0.1, eps=eps)
        y.backward(delta[None, None])
    by = f"{impl} batch_norm"
    doc.assert_matches("batchnorm", "y", y[0, 0], by)
    doc.assert_matches("batchnorm", "grad_x", xl.grad[0, 0], by)
    doc.assert_matches("batchnorm", "grad_gamma", gl.grad.reshape(1, 1), by)
    doc.assert_matches("batchnorm", "grad_beta", bl.grad.reshape(1, 1), by)
    doc.assert_matches("batchnorm", "running_mean", running_mean.reshape(1, 1), by)
    doc.assert_matches("batchnorm", "running_var", running_var.reshape(1, 1), by)
    sigma = (x.var(unbiased=False) + eps).sqrt()
    doc.assert_matches("batchnorm", "sigma", sigma.reshape(1, 1), "√(var + ε)")
    doc.assert_matches("batchnorm", "x_hat", (x - x.mean()) / sigma, "(x − μ)/σ")


def batch_norm_formula_terms(doc: Document, block: Block) -> List[Tuple]:
    """y = γ·x̂ + β; δx = γ/(Nσ)·N·δy + γ/(Nσ)·(−Σδy) + γ/(Nσ)·(−1)·x̂·Σ(δy·x̂) (section 16)."""
    i, j = block.entry
    x, gamma, beta, _, delta = batch_norm_given(doc)
    x_hat, sigma = doc.value("batchnorm", "x_hat"), doc.value("batchnorm", "sigma").item()
    if block.quantity == "y":
        return [(gamma.item(), x_hat[i, j].item()), (beta.item(),)]
    if block.quantity == "grad_x":
        count = x.numel()
        scale = gamma.item() / (count * sigma)
        return [(scale, float(count), delta[i, j].item()), (scale, -delta.sum().item()),
                (scale, -1.0, x_hat[i, j].item(), (delta * x_hat).sum().item())]
    raise AssertionError(f"no formula known for the worked entry {block.name}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_batch_norm_example(impl):
    check_batch_norm_example(load(), impl)


# ---------------------------------------------------------------------------------------------
# Section 17: activations and softmax (worked example)


def check_activations_example(doc: Document, impl: str) -> None:
    """f(x) and f′(x) (δy = 1) of hardswish, hardsigmoid, relu6, GELU, SiLU at the document's
    inputs; softmax and log-softmax of a row with a masked logit, and their deltas."""
    x = doc.value("activations", "x")
    with implementation(impl) as lib:
        for name, value in (("hardswish", True), ("hardsigmoid", True), ("relu6", False), ("gelu", True),
                            ("silu", False)):
            xl = x.clone().requires_grad_(True)
            y = getattr(lib, name)(xl)
            y.backward(torch.ones_like(y))
            if value:
                doc.assert_matches("activations", name, y, f"{impl} {name}")
            doc.assert_matches("activations", f"{name}_grad", xl.grad, f"{impl} {name} backward")
        z, delta = doc.value("softmax", "z"), doc.value("softmax", "delta")
        zl = z.clone().requires_grad_(True)
        y = lib.softmax(zl, dim=1)
        y.backward(delta)
        doc.assert_matches("softmax", "y", y, f"{impl} softmax")
        doc.assert_matches("softmax", "grad_z", zl.grad, f"{impl} softmax backward")
        zl = z.clone().requires_grad_(True)
        lib.log_softmax(zl, dim=1).backward(delta)
        doc.assert_matches("softmax", "log_grad_z", zl.grad, f"{impl} log_softmax backward")


def activation_formula_terms(doc: Document, block: Block) -> List[Tuple]:
    """hardswish′(x) = x/3 + ½ on −3 < x < 3; softmax: δx_i = y_i·δy_i + (−y_i)·Σ_k δy_k·y_k."""
    i, j = block.entry
    if block.example == "activations" and block.quantity == "hardswish_grad":
        x = doc.value("activations", "x")[i, j].item()
        assert -3 < x < 3, f"{block.name}: x = {x} is not on the middle piece"
        return [(x, "/", 3.0), (0.5,)]
    if block.example == "softmax" and block.quantity == "grad_z":
        y, delta = doc.value("softmax", "y"), doc.value("softmax", "delta")
        return [(y[i, j].item(), delta[i, j].item()), (-y[i, j].item(), (delta[i] * y[i]).sum().item())]
    raise AssertionError(f"no formula known for the worked entry {block.name}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_activations_example(impl):
    check_activations_example(load(), impl)


# ---------------------------------------------------------------------------------------------
# Section 18: Winograd F(2×2, 3×3) (one tile's worked example)


def winograd_transforms(doc: Document):
    return doc.value("winograd", "B_T"), doc.value("winograd", "G"), doc.value("winograd", "A_T")


def winograd_tile(B_T: torch.Tensor, G: torch.Tensor, A_T: torch.Tensor, d: torch.Tensor, g: torch.Tensor):
    """U = G g Gᵀ, V = Bᵀ d B, M = U ⊙ V, y = Aᵀ M A (section 18)."""
    U, V = G @ g @ G.T, B_T @ d @ B_T.T
    M = U * V
    return U, V, M, A_T @ M @ A_T.T


def check_winograd_example(doc: Document, impl: str) -> None:
    """U, V, M, y from the document's transforms and tile; y is the tile's correlation by each
    implementation, and (cpp) by the Winograd kernel itself in float32, which is exact here
    (quarters times small integers); likewise D, P and the weight gradient dg for the given δy."""
    B_T, G, A_T = winograd_transforms(doc)
    d, g = doc.value("winograd", "d"), doc.value("winograd", "g")
    U, V, M, y = winograd_tile(B_T, G, A_T, d, g)
    doc.assert_matches("winograd", "U", U, "G g Gᵀ")
    doc.assert_matches("winograd", "V", V, "Bᵀ d B")
    doc.assert_matches("winograd", "M", M, "U ⊙ V")
    doc.assert_matches("winograd", "y", y, "Aᵀ M A")
    doc.assert_matches("winograd", "y", correlate(impl, d, g), f"{impl}: d ⋆ g")
    if impl == "cpp":
        with winograd_forced():
            y32 = torch.ops.manualconv.conv2d_forward(d.float()[None, None], g.float()[None, None], None,
                                                      [1, 1], [0, 0], [1, 1], 1)
        doc.assert_matches("winograd", "y", y32[0, 0], "the cpp Winograd kernel (float32)")
    # the weight gradient: D = A δy Aᵀ, P = D ⊙ V, ∂J/∂g = Gᵀ P G, which is d ⋆ δy (section 3)
    dy = doc.value("winograd", "dy")
    D = A_T.T @ dy @ A_T
    doc.assert_matches("winograd", "D", D, "A δy Aᵀ")
    doc.assert_matches("winograd", "P", D * V, "D ⊙ V")
    doc.assert_matches("winograd", "dg", G.T @ (D * V) @ G, "Gᵀ P G")
    doc.assert_matches("winograd", "dg", correlate(impl, d, dy), f"{impl}: d ⋆ δy")
    if impl == "cpp":
        with winograd_forced():
            dg32 = torch.ops.manualconv.conv2d_grad_weight(d.float()[None, None], dy.float()[None, None], [1, 1, 3, 3],
                                                           [1, 1], [0, 0], [1, 1], 1)
        doc.assert_matches("winograd", "dg", dg32[0, 0], "the cpp Winograd weight gradient (float32)")


@contextlib.contextmanager
def winograd_forced(choice: str = "always"):
    """MANUALCONV_WINOGRAD=choice (csrc reads it at every call), restored afterwards."""
    import os

    before = os.environ.get("MANUALCONV_WINOGRAD")
    os.environ["MANUALCONV_WINOGRAD"] = choice
    try:
        yield
    finally:
        if before is None:
            del os.environ["MANUALCONV_WINOGRAD"]
        else:
            os.environ["MANUALCONV_WINOGRAD"] = before


def winograd_formula_terms(doc: Document, block: Block) -> List[Tuple]:
    """U[r,s] = Σ_{a,b} G[r,a]·G[s,b] · g[a,b]; V[r,s] = Σ_{p,q} Bᵀ[r,p]·Bᵀ[s,q] · d[p,q]; y[i,j] =
    Σ_{r,s} Aᵀ[i,r]·Aᵀ[j,s] · U[r,s] · V[r,s] (terms with a zero coefficient left out)."""
    i, j = block.entry
    B_T, G, A_T = winograd_transforms(doc)
    d, g = doc.value("winograd", "d"), doc.value("winograd", "g")
    if block.quantity == "U":
        return [((G[i, a] * G[j, b]).item(), g[a, b].item()) for a in range(3) for b in range(3) if G[i, a] * G[j, b] != 0]
    if block.quantity == "V":
        return [((B_T[i, p] * B_T[j, q]).item(), d[p, q].item()) for p in range(4) for q in range(4) if B_T[i, p] * B_T[j, q] != 0]
    if block.quantity == "y":
        U, V = doc.value("winograd", "U"), doc.value("winograd", "V")
        return [((A_T[i, r] * A_T[j, s]).item(), U[r, s].item(), V[r, s].item())
                for r in range(4) for s in range(4) if A_T[i, r] * A_T[j, s] != 0]
    if block.quantity == "dg":  # ∂J/∂g[i,j] = Σ_{r,s} G[r,i]·G[s,j] · D[r,s] · V[r,s]
        D, V = doc.value("winograd", "D"), doc.value("winograd", "V")
        return [((G[r, i] * G[s, j]).item(), D[r, s].item(), V[r, s].item())
                for r in range(4) for s in range(4) if G[r, i] * G[s, j] != 0]
    raise AssertionError(f"no formula known for the worked entry {block.name}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_winograd_example(impl):
    check_winograd_example(load(), impl)


def check_winograd4x4_example(doc: Document, impl: str) -> None:
    """F(4×4, 3×3) on one 6×6 tile: U₅₇₆ = G₂₄ g G₂₄ᵀ, V = Bᵀ d B and y = Aᵀ(U₅₇₆ ⊙ V)A/576 in
    integers (exact in float64), y the tile's correlation by each implementation, and (cpp) by the
    F(4×4) kernel in float32 within Winograd's rigorous bound γ_k·Σ|Aᵀ|[(|G||g||Gᵀ|) ⊙ (|Bᵀ||d||B|)]|A|
    (section 18): G's fractions are inexact in float32, so its result is not exactly y. k = 18
    roundings on a path: 3 per direction in Bᵀ d B, 1 for U, 1 for the product, 4 per direction
    in Aᵀ M A, 1 for the (zero) bias, and the one channel's sum is exact."""
    B_T, G24, A_T = (doc.value("winograd4x4", q) for q in ("B_T", "G24", "A_T"))
    d, g = doc.value("winograd4x4", "d"), doc.value("winograd4x4", "g")
    U576, V = G24 @ g @ G24.T, B_T @ d @ B_T.T
    doc.assert_matches("winograd4x4", "U576", U576, "G₂₄ g G₂₄ᵀ")
    doc.assert_matches("winograd4x4", "V", V, "Bᵀ d B")
    doc.assert_matches("winograd4x4", "y", A_T @ (U576 * V) @ A_T.T / 576, "Aᵀ (U₅₇₆ ⊙ V) A / 576")
    y = doc.value("winograd4x4", "y")
    doc.assert_matches("winograd4x4", "y", correlate(impl, d, g), f"{impl}: d ⋆ g")
    if impl == "cpp":
        with winograd_forced("always4x4"):
            y32 = torch.ops.manualconv.conv2d_forward(d.float()[None, None], g.float()[None, None], None,
                                                      [1, 1], [0, 0], [1, 1], 1)[0, 0].double()
        G = G24 / 24
        magnitude = A_T.abs() @ ((G.abs() @ g.abs() @ G.abs().T) * (B_T.abs() @ d.abs() @ B_T.abs().T)) @ A_T.abs().T
        k, eps = 18, 2.0**-24
        assert ((y32 - y).abs() <= k * eps / (1 - k * eps) * magnitude).all(), (y32, y)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_winograd4x4_example(impl):
    check_winograd4x4_example(load(), impl)


def test_winograd_transforms_compute_the_correlation():
    """The document's Bᵀ, G, Aᵀ are an F(2×2, 3×3) algorithm: on random float64 tiles and kernels,
    Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the 2×2 correlation (to float64 rounding of a few terms)."""
    B_T, G, A_T = winograd_transforms(load())
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        d, g = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
        y = winograd_tile(B_T, G, A_T, d, g)[3]
        # |error| ≤ (a few dozen roundings)·u·(64·max|d|·max|g|): 1e-12 is far above it and far below any wrong matrix
        assert torch.allclose(y, F.conv2d(d[None, None], g[None, None])[0, 0], rtol=0, atol=1e-12)
