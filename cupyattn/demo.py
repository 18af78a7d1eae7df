"""A short demonstration: `python -m cupyattn.demo`.

Runs attention on a GPU through CuPy when there is one, else on the CPU through NumPy, and prints
the backend that ran, its error against a float64 computation and the time it took.
"""
import time

import numpy as np

import cupyattn


def _library():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy, "GPU " + cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        pass
    return np, "CPU (NumPy)"


def main():
    xp, where = _library()
    dtype = cupyattn.bfloat16 if xp is not np else np.float32
    batch, heads, length, dim = (4, 16, 2048, 128) if xp is not np else (1, 4, 512, 64)
    rng = np.random.default_rng(0)
    q, k, v = (xp.asarray(rng.standard_normal((batch, heads, length, dim)).astype(dtype)) for _ in range(3))

    report = cupyattn.explain(q, k, v, causal=True)
    out = cupyattn.attention(q, k, v, causal=True)          # warm-up (compiles kernels once)
    if xp is not np:
        xp.cuda.Device().synchronize()
    start = time.perf_counter()
    out = cupyattn.attention(q, k, v, causal=True)
    if xp is not np:
        xp.cuda.Device().synchronize()
    seconds = time.perf_counter() - start

    # float64 check of one head
    def f64(a):
        return np.asarray(a.get() if hasattr(a, "get") else a).astype(np.float64)
    ref = cupyattn.attention(f64(q[0, 0]), f64(k[0, 0]), f64(v[0, 0]), causal=True, backend="eager")
    err = np.linalg.norm(f64(out[0, 0]) - ref) / np.linalg.norm(ref)

    print(f"device:  {where}")
    print(f"problem: q, k, v {tuple(q.shape)} {np.dtype(dtype).name}, causal")
    print(f"backend: {report.backend}")
    print(report)
    print(f"error against float64 (one head): {err:.2e}")
    print(f"time: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
