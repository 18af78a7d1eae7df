"""Shared helpers for the bench scripts: platform detection, timing, peak memory, errors, output.

Nothing here imports torch or matplotlib at module load; the scripts import them only when asked.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Benchmark the checkout we live in, not some installed copy.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# ----------------------------------------------------------------------------------------------
# Platform

def detect_gpu():
    """(cupy module, "") when a CUDA device is usable, else (None, why not)."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - any import failure means "no GPU path"
        return None, f"CuPy not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return None, f"no usable CUDA device ({first_line(e)})"
    if n == 0:
        return None, "no CUDA device"
    return cupy, ""


def import_torch():
    """(torch, "") when torch with CUDA is importable, else (None, why not)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return None, f"torch not importable ({type(e).__name__})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    return torch, ""


def first_line(e, limit=200) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_oom(e) -> bool:
    """Out-of-memory from CuPy, torch, cuBLAS or NumPy."""
    if isinstance(e, MemoryError):
        return True
    for mod, names in (("cupy.cuda.memory", ("OutOfMemoryError",)),
                       ("torch", ("OutOfMemoryError",)), ("torch.cuda", ("OutOfMemoryError",))):
        m = sys.modules.get(mod)
        for n in names:
            cls = getattr(m, n, None) if m is not None else None
            if isinstance(cls, type) and isinstance(e, cls):
                return True
    msg = str(e).lower()
    return ("out of memory" in msg or "alloc_failed" in msg or "memoryallocation" in msg
            or "cudaerrormemoryallocation" in msg)


def git_commit() -> str:
    # A copy of the tree without its git history (a lent GPU machine) names it through this variable.
    if os.environ.get("CUPYATTN_COMMIT"):
        return os.environ["CUPYATTN_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "?"


def environment(cupy=None, torch=None) -> dict:
    """Versions and device facts for the JSON header."""
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    try:
        import cupy as _cp
        meta["cupy"] = _cp.__version__
    except Exception:  # noqa: BLE001
        meta["cupy"] = None
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        meta.update({
            "platform": "GPU",
            "gpu": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "sm_count": props.get("multiProcessorCount"),
            "l2_bytes": props.get("l2CacheSize"),
            "gpu_memory_bytes": props.get("totalGlobalMem"),
            "driver": _cuda_version(cupy.cuda.runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
        })
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            if out:
                meta["driver_version"] = out.splitlines()[0]
        except Exception:  # noqa: BLE001
            pass
    else:
        meta.update({"platform": "CPU (NumPy)", "gpu": None, "cpu": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count()})
    if torch is not None:
        meta["torch"] = torch.__version__
        meta["torch_cuda"] = torch.version.cuda
        try:
            meta["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001
            meta["cudnn"] = None
    else:
        meta["torch"] = None
    return meta


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "cpu").strip("-").lower() or "cpu"


# ----------------------------------------------------------------------------------------------
# Timing

def _sync(lib):
    if lib == "cupy":
        import cupy
        cupy.cuda.Device().synchronize()
    elif lib == "torch":
        import torch
        torch.cuda.synchronize()


def time_calls(calls, lib: str, *, reps: int, min_reps: int = 3, warmup: int = 2, budget_s: float = 1.0,
               first_ms: float = None):
    """Median milliseconds of one call, rotating through `calls` (one per input set).

    lib: "cupy" (CuPy CUDA events), "torch" (torch CUDA events) or "cpu" (perf_counter).
    The number of timed repeats is `reps`, reduced (not below `min_reps`) so that the timed loop
    takes about `budget_s`; `first_ms` (a prior untimed call) feeds that estimate. Each repeat is
    timed by its own pair of events, the calls are queued back to back without synchronising.
    Returns dict(ms=median, mean_ms, min_ms, reps).
    """
    n = len(calls)
    est = first_ms
    if warmup > 0 and (est is None or est < 1000 * budget_s):
        _sync(lib)
        t0 = time.perf_counter()
        for i in range(warmup):
            calls[i % n]()
        _sync(lib)
        est = 1000 * (time.perf_counter() - t0) / warmup
    est = max(est or 1e-3, 1e-3)
    reps = int(max(min_reps, min(reps, (1000 * budget_s) // est)))

    times = []
    if lib == "cpu":
        for i in range(reps):
            t0 = time.perf_counter()
            calls[i % n]()
            times.append(1000 * (time.perf_counter() - t0))
    else:
        if lib == "cupy":
            import cupy
            make = cupy.cuda.Event
            elapsed = cupy.cuda.get_elapsed_time
        else:
            import torch

            def make():
                return torch.cuda.Event(enable_timing=True)

            def elapsed(a, b):
                return a.elapsed_time(b)
        events = [(make(), make()) for _ in range(reps)]
        _sync(lib)
        for i, (a, b) in enumerate(events):
            a.record()
            calls[i % n]()
            b.record()
        _sync(lib)
        times = [elapsed(a, b) for a, b in events]
    return {"ms": float(np.median(times)), "mean_ms": float(np.mean(times)), "min_ms": float(np.min(times)),
            "reps": reps}


# ----------------------------------------------------------------------------------------------
# Peak memory: bytes allocated during one call, beyond what was allocated before it

def _cupy_peak_hook():
    from cupy.cuda import memory_hook

    class PeakHook(memory_hook.MemoryHook):
        name = "BenchPeakHook"

        def __init__(self):
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, **kw):
            self.current += kw["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw):
            self.current -= kw["mem_size"]

    return PeakHook()


def measure_peak(fn, lib: str):
    """(result of fn(), peak extra bytes allocated during the call).

    cupy: a CuPy memory hook on the memory pool counts every block handed out during the call
    (cuBLAS workspaces CuPy allocates included). torch: torch's allocator counter, reset before the
    call. cpu: tracemalloc (NumPy reports its buffers to it). Inputs allocated before the call do
    not count; outputs (still alive at the end) do.
    """
    if lib == "cupy":
        hook = _cupy_peak_hook()
        _sync(lib)
        with hook:
            result = fn()
            _sync(lib)
        return result, int(hook.peak)
    if lib == "torch":
        import torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, int(torch.cuda.max_memory_allocated() - base)
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, int(peak)


def free_memory(cupy=None, torch=None, collect=True):
    """Give cached blocks back so one measurement's leftovers do not starve the next (`collect`:
    run the garbage collector first, for arrays held by a caught exception's frames)."""
    if collect:
        import gc
        gc.collect()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Accuracy against float64 on a subsample of rows

def to_f64(a) -> np.ndarray:
    """NumPy float64 copy of a NumPy, CuPy or torch array (bfloat16 included)."""
    if hasattr(a, "detach"):                      # torch
        return a.detach().float().cpu().numpy().astype(np.float64)
    if hasattr(a, "get"):                         # cupy: copy as is, convert on the host
        a = a.get()
    return np.asarray(a).astype(np.float64)


def reference_rows(q, k, v, rows, *, causal, scale, dout=None):
    """Float64 attention output for some query rows of one head: q (Lq, D), k (Lk, D), v (Lk, Dv).

    Returns out (len(rows), Dv) and, when dout (len(rows), Dv) is given, dq for those rows too
    (dq of a row needs only that row's probabilities, so it is exact on a subsample).
    """
    lq, lk = q.shape[0], k.shape[0]
    s = (q[rows] @ k.T) * scale
    if causal:
        visible = np.arange(lk)[None, :] <= (np.asarray(rows)[:, None] + (lk - lq))
        s = np.where(visible, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    p = np.exp(s - m)
    denom = p.sum(axis=1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1.0)
    out = p @ v
    if dout is None:
        return out, None
    dp = dout @ v.T
    delta = (p * dp).sum(axis=1, keepdims=True)
    dq = ((p * (dp - delta)) @ k) * scale
    return out, dq


def error_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    """max |got - ref| and that divided by max |ref| ("rel")."""
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return {"max_abs_err": err, "rel_err": err / scale if scale > 0 else err}


# ----------------------------------------------------------------------------------------------
# Output

class Progress:
    """A text progress bar on stderr (redrawn in place on a terminal, a line per ~5% otherwise)."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._last_pct = -100

    def update(self, label: str = ""):
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(self.width * frac)
        elapsed = time.perf_counter() - self.t0
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s  {label}")
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if self.done >= self.total:
                sys.stderr.write("\n")
        elif 100 * frac - self._last_pct >= 5 or self.done >= self.total:
            self._last_pct = 100 * frac
            sys.stderr.write(line[:150] + "\n")
        sys.stderr.flush()


def format_table(headers, rows, right=None) -> str:
    """Aligned plain-text table; columns listed in `right` (or holding numbers) are right-aligned."""
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = set(right or [])

    def fmt(row):
        out = []
        for i, c in enumerate(row):
            last = i == len(row) - 1
            if i in right:
                out.append(c.rjust(widths[i]))
            else:
                out.append(c if last else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def fmt_num(x, digits=3):
    """Compact number for tables: 3 significant digits, scientific for tiny errors."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax < 1e-2 or ax >= 1e6:
        return f"{x:.1e}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def write_json(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
