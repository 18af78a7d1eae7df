"""The kernel loader's launch path (_kernels.launch), with the driver call replaced: no GPU needed."""
import ctypes

import numpy as np
import pytest

from cupyattn import _kernels

cupy = pytest.importorskip("cupy")
driver = pytest.importorskip("cupy_backends.cuda.api.driver")


class _Stream:
    ptr = 1234


def test_launch_passes_each_argument_by_value_cpu(monkeypatch):
    """Every argument's bytes reach cuLaunchKernel through its own pointer, with the grid, block,
    shared memory and stream given; a second launch with the same layout reuses the buffers and
    must carry the new values, not the old ones."""
    seen = []

    def fake_launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        pointers = (ctypes.c_void_p * len(sizes)).from_address(params)
        seen.append(dict(f=f, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream, extra=extra,
                         values=[ctypes.string_at(pointers[i], n) for i, n in enumerate(sizes)]))

    monkeypatch.setattr(driver, "launchKernel", fake_launch)
    monkeypatch.setattr(_kernels, "_function_ptr", lambda function: 0xF00)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: _Stream())
    rng = np.random.default_rng(0)
    for _ in range(2):
        tmap = np.zeros(1, dtype=[("v", "<u8", (16,))])
        tmap["v"] = rng.integers(0, 2**63, size=16, dtype=np.uint64)
        args = (tmap, np.uint64(rng.integers(2**40)), np.int32(rng.integers(-2**31, 2**31)),
                np.float32(rng.standard_normal()), tmap.copy())
        sizes = [128, 8, 4, 4, 128]
        _kernels.launch("kernel", 132, 384, args, shared_mem=200_000)
        got = seen[-1]
        assert (got["f"], got["grid"], got["block"], got["smem"], got["stream"], got["extra"]) == \
            (0xF00, (132, 1, 1), (384, 1, 1), 200_000, 1234, 0)
        assert got["values"] == [a.tobytes() for a in args]
    assert seen[0]["values"] != seen[1]["values"]


def test_launch_makes_a_context_current_for_a_fresh_thread_cpu(monkeypatch):
    """A launch refused for want of a current context (a host thread whose first CUDA work it is)
    makes the device's primary context current (cudaFree(0)) and launches again; other errors
    pass through untouched."""
    class FakeDriverError(Exception):
        def __init__(self, status):
            self.status = status

    calls, freed = [], []

    def fake_launch(*args):
        calls.append(args)
        if len(calls) == 1:
            raise FakeDriverError(201)     # CUDA_ERROR_INVALID_CONTEXT

    monkeypatch.setattr(driver, "CUDADriverError", FakeDriverError)
    monkeypatch.setattr(driver, "launchKernel", fake_launch)
    monkeypatch.setattr(cupy.cuda.runtime, "free", lambda ptr: freed.append(ptr))
    monkeypatch.setattr(_kernels, "_function_ptr", lambda function: 0xF00)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: _Stream())
    _kernels.launch("kernel", 1, 128, (np.int32(7),))
    assert freed == [0] and len(calls) == 2 and calls[0] == calls[1]

    def failing_launch(*args):
        raise FakeDriverError(700)         # CUDA_ERROR_ILLEGAL_ADDRESS: not ours to retry
    monkeypatch.setattr(driver, "launchKernel", failing_launch)
    with pytest.raises(FakeDriverError):
        _kernels.launch("kernel", 1, 128, (np.int32(7),))
    assert freed == [0]
