import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import manualconv  # noqa: E402
from manualconv import ops  # noqa: E402

# Both backends are always tested. The C++ one must be built (README's test command builds it):
# a missing extension is a failure here, not a silent reduction of the suite.
BACKENDS = ("reference", "cpp")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpp":
        assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    with manualconv.use_backend(request.param):
        yield request.param


@pytest.fixture
def cpp():
    """The C++ backend only (for whole-model tests the reference backend would take minutes on)."""
    assert ops.AVAILABLE, f"the C++ extension is not built: {ops.LOAD_ERROR}"
    with manualconv.use_backend("cpp"):
        yield
