"""Where one attention call spends its time: host (Python, enqueue) against GPU (the kernels).

    PYTHONPATH=. python3 tools/profile_call.py [--profile]

For each shape (bf16, B*L = 16k tokens, H*D = 2048, the bench's headline grid at short L) it times
  call_ms    one `cupyattn.attention` call as the bench does (events around each call, queued
             back to back): what a user sees
  host_ms    the host's time per call when the GPU is not the bottleneck (perf_counter over a
             loop, then synchronise)
  kernel_ms  the GPU time of the launches alone: every launch of one call (a RawKernel call or
             _kernels.launch) is recorded and replayed 20 times between two events, with little
             Python in between
A call is host-bound when host_ms > kernel_ms. --profile adds a cProfile of 300 calls of the
first shape (top functions by own time), to show which Python steps cost what.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cupy  # noqa: E402

import cupyattn  # noqa: E402

BF16 = np.dtype(cupyattn.bfloat16)
SHAPES = [  # (D, L, causal)
    (128, 1024, True), (128, 1024, False), (256, 1024, True), (256, 1024, False),
    (64, 1024, True), (64, 1024, False), (128, 4096, True), (128, 4096, False),
]


def inputs(d, length, seed):
    rng = cupy.random.default_rng(seed)
    b, h = 16384 // length, 2048 // d
    return [rng.standard_normal((b, h, length, d), dtype=np.float32).astype(BF16) for _ in range(3)]


def events_ms(fn, reps):
    pairs = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    cupy.cuda.Device().synchronize()
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    cupy.cuda.Device().synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(a, b) for a, b in pairs]))


class LaunchRecorder:
    """Wraps cupy.RawKernel-like function objects returned by the loader to record launches."""

    def __init__(self):
        self.launches = []
        self.recording = False

    def wrap(self, get_function):
        recorder = self

        def wrapped(*a, **kw):
            fn = get_function(*a, **kw)
            if not recorder.recording:     # no wrapper (and no cost) outside the recorded call
                return fn

            class Recorded:
                def __getattr__(self, name):
                    return getattr(fn, name)

                def __setattr__(self, name, value):
                    setattr(fn, name, value)

                def __call__(self, grid, block, args, **launch_kw):
                    if recorder.recording:
                        recorder.launches.append(lambda: fn(grid, block, args, **launch_kw))
                    return fn(grid, block, args, **launch_kw)
            return Recorded()
        return wrapped

    def wrap_launch(self, launch):
        """_kernels.launch (cuLaunchKernel with packed arguments), recorded as a replayable call."""
        recorder = self

        def wrapped(fn, blocks, threads, args, shared_mem=0):
            if recorder.recording:
                recorder.launches.append(lambda: launch(fn, blocks, threads, args, shared_mem=shared_mem))
            return launch(fn, blocks, threads, args, shared_mem=shared_mem)
        return wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--backward", action="store_true", help="also time attention_backward")
    args = ap.parse_args()

    from cupyattn import _kernels, _flash, _flash_sm90, _flash_bwd
    rec = LaunchRecorder()
    for mod in (_kernels, _flash, _flash_sm90, _flash_bwd):
        if hasattr(mod, "get_function"):
            mod.get_function = rec.wrap(getattr(mod, "get_function"))
        if hasattr(mod, "launch"):
            mod.launch = rec.wrap_launch(getattr(mod, "launch"))

    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    header = f"{'D':>4} {'L':>6} {'causal':>6} {'call_ms':>8} {'host_ms':>8} {'kernel_ms':>9} {'launches':>8}  bound"
    print(header)
    for d, length, causal in SHAPES:
        sets = [inputs(d, length, s) for s in range(3)]
        calls = [lambda s=s: cupyattn.attention(*s, causal=causal) for s in sets]
        for c in calls:
            c()
        cupy.cuda.Device().synchronize()
        call_ms = min(events_ms(lambda: calls[0](), 30), events_ms(lambda: calls[1](), 30))
        n = 200
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % 3]()
        host_ms = 1000 * (time.perf_counter() - t0) / n
        cupy.cuda.Device().synchronize()
        rec.launches.clear()
        rec.recording = True
        calls[0]()
        rec.recording = False
        launches = list(rec.launches)

        def replay():
            for relaunch in launches:
                relaunch()
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        replay()
        a.record()
        for _ in range(20):
            replay()
        b.record()
        b.synchronize()
        kernel_ms = cupy.cuda.get_elapsed_time(a, b) / 20
        bound = "host" if host_ms > kernel_ms else "gpu"
        print(f"{d:>4} {length:>6} {str(causal):>6} {call_ms:8.3f} {host_ms:8.3f} {kernel_ms:9.3f} {len(launches):>8}  {bound}",
              flush=True)
        if args.backward:
            q, k, v = sets[0]
            out, lse = cupyattn.attention(q, k, v, causal=causal, return_lse=True)
            dout = cupy.random.default_rng(9).standard_normal(out.shape, dtype=np.float32).astype(BF16)
            bwd = lambda: cupyattn.attention_backward(dout, q, k, v, out, lse, causal=causal)  # noqa: E731
            bwd()
            cupy.cuda.Device().synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                bwd()
            bhost = 1000 * (time.perf_counter() - t0) / 50
            cupy.cuda.Device().synchronize()
            print(f"      backward: call_ms {events_ms(bwd, 10):.3f} host_ms {bhost:.3f}", flush=True)
        sets = calls = None   # free the inputs before the next shape

    if args.profile:
        d, length, causal = SHAPES[0]
        q, k, v = inputs(d, length, 0)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            cupyattn.attention(q, k, v, causal=causal)
        prof.disable()
        cupy.cuda.Device().synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue())


if __name__ == "__main__":
    main()
