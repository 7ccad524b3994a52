"""Test-wide setup: the Triton interpreter on CPU-only machines and throwaway caches/databases."""

import os
import tempfile

# Triton reads this at import time; set it before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

_session_dir = tempfile.mkdtemp(prefix="kdsl-tests-")
os.environ.setdefault("KDSL_CACHE_DIR", os.path.join(_session_dir, "cache"))
os.environ.setdefault("KDSL_DB", "sqlite:///" + os.path.join(_session_dir, "tuning.sqlite"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The suite runs on two busy cores next to subprocess-heavy tests: wall-clock stalls there say
# nothing about the code, so Hypothesis neither times examples nor fails on slow generation.
settings.register_profile("kdsl", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kdsl")


@pytest.fixture
def gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny CPU ops on a shared machine: one intra-op thread avoids OpenMP contention stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
