"""Shared fixtures: the array library a test body runs on, and the hypothesis profiles."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "fuzz", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("CUPYATTN_HYPOTHESIS_PROFILE", "ci"))


def _gpu_missing_reason():
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver / no device: CuPy raises a CUDARuntimeError
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no CUDA device"


GPU_MISSING = _gpu_missing_reason()
requires_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs a GPU: {GPU_MISSING}")


def pytest_collection_modifyitems(config, items):
    # Anything marked gpu is skipped, with the reason, where there is no GPU.
    for item in items:
        if "gpu" in item.keywords and GPU_MISSING is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {GPU_MISSING}"))


@pytest.fixture(scope="session", params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array library the test body runs on: NumPy always, CuPy where there is a GPU.
    Session-scoped: it is a stateless module, so hypothesis may reuse it across examples."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy
