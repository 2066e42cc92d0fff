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


# Hypothesis profiles for tests/test_properties.py. 'ci' (the default): a bounded, derandomized
# run (the same examples every time, no example database), so CI is reproducible and fast.
# 'long': `pytest tests/test_properties.py --hypothesis-profile=long` for a deeper random search.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=_SLOW_OK,
                          print_blob=True)
settings.load_profile("ci")
