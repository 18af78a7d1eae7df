"""Chunked backend on one GPU: timings next to torch's efficient SDPA, where the time goes, a quick
correctness check. One device call, well under 90 s (run from the repo root):

    PYTHONPATH=. python3 tools/tune_chunked.py            # --quick: L=4k only, no budget sweep
    PYTHONPATH=. python3 tools/tune_chunked.py --softmax  # only the softmax launch sweep (~20 s)
    PYTHONPATH=. python3 tools/tune_chunked.py --quick --causal   # + the causal row-tile sweep at 4k
    PYTHONPATH=. python3 tools/tune_chunked.py --quick --budget   # + the workspace budget sweep, 4k and 16k

bf16, D=128, H=16, B*L = 16k tokens, L in {4k, 16k}, causal and not: chunked forward and fwd+bwd
(CUDA events, median of 5) against torch `sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)` on the
same memory (DLPack; skipped when torch is missing). Then, per shape, the uninstrumented host time
per call (perf_counter over back-to-back calls, no synchronisation) against the GPU time of the
same calls (HOST lines: host ~ GPU means host-bound), and one instrumented forward and backward:
every cuBLAS call and fused-kernel launch is bracketed by CUDA events (wrappers around
`_CudaDevice.gemm` / `.launch`), giving GEMM vs softmax time, the softmax step's bytes and its
achieved bandwidth, and the host (enqueue) time of the instrumented call.
Then a sweep of the forward softmax's launch configurations (SOFTMAX lines): the shared-memory
kernel the forward used before register rows ("smem"), the default register rows, and other
register widths / threads per row / block sizes (compiled at run time), each timed on one
instrumented forward per shape, so the defaults in cupyattn/_chunked.py (FORWARD_VPT,
register_launch_shape) can be checked against the alternatives on the machine at hand.
Last lines: a compact summary.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cupy  # noqa: E402

import cupyattn  # noqa: E402
from cupyattn import _chunked  # noqa: E402

BF16 = np.dtype(cupyattn.bfloat16)
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:5.1f}s]", *a, flush=True)


def bf16(x):
    try:
        return x.astype(BF16)
    except Exception:  # noqa: BLE001 - keep the upper 16 bits
        return (x.view(cupy.uint32) >> 16).astype(cupy.uint16).view(BF16)


def median_ms(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def flops(B, H, L, D, causal, op):
    f = 4.0 * B * H * L * L * D
    f = f / 2 if causal else f
    return f * (3.5 if op == "fwdbwd" else 1.0)      # bwd = 2.5x fwd (5 products of 2)


# ---------------------------------------------------------------------------------------------
# Instrumentation: CUDA events around each step of the CuPy path.

class StepTimer:
    """CUDA events around every cuBLAS call and fused-kernel launch of the CuPy path (wrappers
    around `_CudaDevice.gemm` / `.launch`, the only places it reaches the GPU)."""
    KINDS = {"softmax": "softmax", "recompute": "softmax", "dscores": "dscores"}

    def __init__(self, dtype=BF16):
        self.events = []            # (kind, start, end, bytes)
        self.saved = {}
        self.ps = np.dtype(dtype).itemsize            # P / dS bytes per element
        self.cs = 8 if np.dtype(dtype) == np.float64 else 4

    def __enter__(self):
        cls = _chunked._CudaDevice
        timer = self
        for name in ("gemm", "launch"):
            self.saved[name] = cls.__dict__[name]      # launch is a staticmethod: restore it as such
        gemm, launch = getattr(cls, "gemm"), getattr(cls, "launch")

        def timed_gemm(dev, *args):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record()
            gemm(dev, *args)
            b.record()
            timer.events.append(("gemm", a, b, 0))

        def timed_launch(dev, kind, fn, grid, block, args, shared_mem, scores):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record()
            launch(kind, fn, grid, block, args, shared_mem, scores)
            b.record()
            if kind == "dscores":
                nbytes = scores * (2 * timer.ps + timer.cs)      # read P, dP, write dS
            else:
                nbytes = scores * (timer.cs + timer.ps)          # read S once, write P (upper bound)
            timer.events.append((timer.KINDS[kind], a, b, nbytes))
        cls.gemm, cls.launch = timed_gemm, timed_launch
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(_chunked._CudaDevice, name, orig)

    def summary(self):
        cupy.cuda.Device().synchronize()
        out = {}
        for kind, a, b, nbytes in self.events:
            ms, by, n = out.get(kind, (0.0, 0, 0))
            out[kind] = (ms + cupy.cuda.get_elapsed_time(a, b), by + nbytes, n + 1)
        return out


def host_and_gpu_ms(fn, reps=10):
    """Uninstrumented: the host's time per call (perf_counter over `reps` back-to-back calls, no
    synchronisation in between) and the GPU's (events around the same calls, then synchronise).
    host < GPU: the GPU is the bottleneck (the host runs ahead); host ~ GPU: host-bound."""
    fn()
    cupy.cuda.Device().synchronize()
    a, b = cupy.cuda.Event(), cupy.cuda.Event()
    a.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / reps
    b.record()
    b.synchronize()
    return host, cupy.cuda.get_elapsed_time(a, b) / reps


# ---------------------------------------------------------------------------------------------

def make(B, H, L, D, seed=0, fwdbwd=False):
    rng = cupy.random.default_rng(seed)
    arrs = [bf16(rng.standard_normal((B, H, L, D), dtype=cupy.float32)) for _ in range(4 if fwdbwd else 3)]
    return arrs


def torch_fns(torch, q, k, v, dout, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional

    def conv(a):
        try:
            return torch.from_dlpack(a)
        except Exception:  # noqa: BLE001
            return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)
    tq, tk, tv = (conv(a) for a in (q, k, v))
    tdo = conv(dout)
    gq, gk, gv = (t.detach().clone().requires_grad_(True) for t in (tq, tk, tv))

    def fwd():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def fwdbwd():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal)
        o.backward(tdo)
        gq.grad = gk.grad = gv.grad = None
    return fwd, fwdbwd


def part_timing(Ls, torch, rows):
    H, D, tokens = 16, 128, 16384
    for L in Ls:
        B = max(1, tokens // L)
        q, k, v, dout = make(B, H, L, D, fwdbwd=True)
        for causal in (False, True):
            res = {}
            out_lse = {}

            def c_fwd():
                out_lse["v"] = cupyattn.attention(q, k, v, causal=causal, backend="chunked", return_lse=True)

            def c_fwdbwd():
                o, lse = cupyattn.attention(q, k, v, causal=causal, backend="chunked", return_lse=True)
                cupyattn.attention_backward(dout, q, k, v, o, lse, causal=causal, backend="chunked")
            res["chunked fwd"] = median_ms(c_fwd)
            res["chunked fwdbwd"] = median_ms(c_fwdbwd)
            if torch is not None:
                try:
                    t_fwd, t_fwdbwd = torch_fns(torch, q, k, v, dout, causal)
                    res["torch fwd"] = median_ms(t_fwd)
                    res["torch fwdbwd"] = median_ms(t_fwdbwd)
                except Exception as exc:  # noqa: BLE001
                    log(f"torch failed: {type(exc).__name__}: {exc}")

            # uninstrumented host time per call against the GPU's (back-to-back calls)
            o, lse = cupyattn.attention(q, k, v, causal=causal, backend="chunked", return_lse=True)
            host_gpu = {"fwd": host_and_gpu_ms(c_fwd),
                    "bwd": host_and_gpu_ms(lambda: cupyattn.attention_backward(
                        dout, q, k, v, o, lse, causal=causal, backend="chunked"))}
            # one instrumented forward and backward: where the time goes, host enqueue time
            cupy.cuda.Device().synchronize()
            with StepTimer() as tf:
                h0 = time.perf_counter()
                o, lse = cupyattn.attention(q, k, v, causal=causal, backend="chunked", return_lse=True)
                host_f = (time.perf_counter() - h0) * 1e3
                fsum = tf.summary()
            with StepTimer() as tb:
                h0 = time.perf_counter()
                cupyattn.attention_backward(dout, q, k, v, o, lse, causal=causal, backend="chunked")
                host_b = (time.perf_counter() - h0) * 1e3
                bsum = tb.summary()
            problem = cupyattn._api.normalize(q, k, v, causal=causal)
            tag = f"L={L:5d} B={B:2d} causal={'yes' if causal else 'no '}"
            for op in ("fwd", "fwdbwd"):
                c = res[f"chunked {op}"]
                t = res.get(f"torch {op}")
                tf_c = flops(B, H, L, D, causal, op) / c / 1e9
                line = f"TIME {tag} {op:6} chunked {c:7.2f} ms {tf_c:6.1f} TFLOP/s"
                if t:
                    line += f" | torch-eff {t:7.2f} ms {flops(B, H, L, D, causal, op) / t / 1e9:6.1f} TFLOP/s | ratio {t / c:.2f}x"
                log(line)
                rows.append((tag, op, c, t))
            for name, summ, host in (("fwd", fsum, host_f), ("bwd", bsum, host_b)):
                parts = []
                for kind in ("gemm", "softmax", "dscores"):
                    if kind in summ:
                        ms, by, n = summ[kind]
                        bw = by / (ms * 1e-3) / 1e12 if ms > 0 else 0
                        extra = f" {by / 1e9:.2f} GB {bw:.2f} TB/s" if by else ""
                        parts.append(f"{kind} {ms:6.2f} ms/{n} calls{extra}")
                log(f"SPLIT {tag} {name}: " + " | ".join(parts) + f" | host enqueue {host:6.2f} ms (instrumented)")
            for name, (h, g) in host_gpu.items():
                log(f"HOST  {tag} {name}: host {h:6.2f} ms/call uninstrumented, no sync | GPU {g:6.2f} ms/call "
                    f"back to back | {'host' if h > 0.9 * g else 'GPU'}-bound")
            fr = _chunked.chunk_rows(problem, "forward")
            log(f"PLAN  {tag} rows/chunk fwd {fr} bwd {_chunked.chunk_rows(problem, 'backward')} "
                f"row tile {_chunked.row_tile(problem)} softmax(vpt,tpr,rpb,smem,resident)={forward_launch(L)} "
                f"recompute(tpr,rpb,vec)={_chunked.launch_shape(L, 4)}")
            del out_lse


def forward_launch(n, itemsize=4):
    """The forward softmax's launch for full rows of n keys (kernel vpt, tpr, rpb, smem, resident)."""
    limit = _chunked.resident_smem_limit(cupy.cuda.Device().id)
    return _chunked.forward_launch(n, itemsize, _chunked.forward_vpt(itemsize), limit)


@contextlib.contextmanager
def softmax_config(vpt=None, tpr_mul=1, block=None):
    """Forward softmax launch overrides: register width `vpt` (0: the shared-memory kernel for
    every row), threads per row times `tpr_mul` (at most 512), `block` threads per block."""
    saved_vpt, saved_shape = dict(_chunked.FORWARD_VPT), _chunked.register_launch_shape
    if vpt is not None:
        _chunked.FORWARD_VPT[4] = vpt

    def shape(n, itemsize, v):
        tpr, rpb, vectors = saved_shape(n, itemsize, v)
        tpr = min(_chunked.MAX_ROW_THREADS, int(tpr * tpr_mul))
        return tpr, max(1, (block or _chunked.BLOCK_THREADS) // tpr), vectors
    _chunked.register_launch_shape = shape
    try:
        yield
    finally:
        _chunked.FORWARD_VPT.clear()
        _chunked.FORWARD_VPT.update(saved_vpt)
        _chunked.register_launch_shape = saved_shape


SOFTMAX_CONFIGS = [
    ("smem (before)", dict(vpt=0)),
    ("regs vpt=8 (default)", dict()),
    ("regs vpt=8 2x threads", dict(tpr_mul=2)),
    ("regs vpt=8 512-thr blocks", dict(block=512)),
    ("regs vpt=4", dict(vpt=4)),
    ("regs vpt=16", dict(vpt=16)),
]


def part_softmax_sweep(Ls):
    """Forward softmax time per launch configuration (one instrumented forward per shape)."""
    H, D, tokens = 16, 128, 16384
    best = {}
    for L in Ls:
        B = max(1, tokens // L)
        q, k, v = make(B, H, L, D)
        for causal in (False, True):
            tag = f"L={L:5d} causal={'yes' if causal else 'no '}"
            for name, cfg in SOFTMAX_CONFIGS:
                with softmax_config(**cfg):
                    try:
                        cupyattn.attention(q, k, v, causal=causal, backend="chunked")     # compile, warm up
                        cupy.cuda.Device().synchronize()
                        with StepTimer() as t:
                            cupyattn.attention(q, k, v, causal=causal, backend="chunked")
                            summ = t.summary()
                    except Exception as exc:  # noqa: BLE001 - a configuration that does not build or launch
                        log(f"SOFTMAX {tag} {name:26} failed: {type(exc).__name__}: {exc}")
                        continue
                    ms, by, n = summ["softmax"]
                    bw = by / (ms * 1e-3) / 1e12
                    log(f"SOFTMAX {tag} {name:26} {ms:7.3f} ms/{n} calls {by / 1e9:6.2f} GB {bw:5.2f} TB/s "
                        f"(full rows: vpt,tpr,rpb,smem,resident={forward_launch(L)})")
                    if bw > best.get(tag, ("", 0.0))[1]:
                        best[tag] = (name, bw)
    for tag, (name, bw) in best.items():
        log(f"SOFTMAX best {tag}: {name} {bw:.2f} TB/s")


BUDGETS_MIB = (8, 16, 32, 64, 128, 256, 512)


def part_budget_sweep(Ls):
    """Forward time against the workspace budget. Small budgets make more, smaller chunks (more
    host work and launches) whose scores may stay in L2 between the products and the softmax."""
    H, D = 16, 128
    for L in Ls:
        B = max(1, 16384 // L)
        q, k, v = make(B, H, L, D, seed=1)
        for causal in (False, True):
            line = []
            for mib in BUDGETS_MIB:
                with cupyattn.workspace(mib << 20):
                    ms = median_ms(lambda: cupyattn.attention(q, k, v, causal=causal, backend="chunked"), reps=3)
                line.append(f"{mib}MiB {ms:6.2f}")
            log(f"BUDGET L={L:5d} B={B} causal={'yes' if causal else 'no '} fwd ms: " + " | ".join(line))


CAUSAL_TILE_CONFIGS = [(t, m) for t in (4, 8, 16, 32) for m in (128, 256, 512)]   # (CAUSAL_TILES, MIN_CAUSAL_TILE)


@contextlib.contextmanager
def causal_tiles(tiles, min_rows):
    old = _chunked.CAUSAL_TILES, _chunked.MIN_CAUSAL_TILE
    _chunked.CAUSAL_TILES, _chunked.MIN_CAUSAL_TILE = tiles, min_rows
    try:
        yield
    finally:
        _chunked.CAUSAL_TILES, _chunked.MIN_CAUSAL_TILE = old


def part_causal_sweep(Ls):
    """Causal forward time per row-tile plan (CAUSAL_TILES x MIN_CAUSAL_TILE): thinner tiles skip
    more of the upper triangle but make the products thinner; CAUSAL lines give the forward's
    time and its products / softmax split (one instrumented forward each)."""
    H, D, tokens = 16, 128, 16384
    for L in Ls:
        B = max(1, tokens // L)
        q, k, v = make(B, H, L, D)
        best = None
        for tiles, min_rows in CAUSAL_TILE_CONFIGS:
            with causal_tiles(tiles, min_rows):
                fn = lambda: cupyattn.attention(q, k, v, causal=True, backend="chunked")  # noqa: E731
                ms = median_ms(fn, reps=3)
                with StepTimer() as t:
                    fn()
                    summ = t.summary()
            g, sm = summ["gemm"][0], summ["softmax"][0]
            mark = " (default)" if (tiles, min_rows) == (8, 256) else ""
            log(f"CAUSAL L={L:5d} tiles={tiles:2d} min_rows={min_rows:3d} row tile {_chunked.row_tile_for(L, tiles, min_rows):5d}: "
                f"fwd {ms:6.2f} ms | gemm {g:6.2f} ms softmax {sm:6.2f} ms{mark}")
            if best is None or ms < best[0]:
                best = (ms, tiles, min_rows)
        log(f"CAUSAL best L={L}: tiles={best[1]} min_rows={best[2]} {best[0]:.2f} ms")


def _ref_f64(q, k, v, causal, mask=None):
    q64, k64, v64 = (a.astype(cupy.float64) for a in (q, k, v))
    s = cupy.matmul(q64, k64.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    allowed = cupy.ones((lq, lk), bool)
    if causal:
        allowed &= cupy.arange(lk)[None, :] <= cupy.arange(lq)[:, None] + (lk - lq)
    if mask is not None:
        allowed = allowed & mask
    s = cupy.where(allowed, s, -cupy.inf)
    m = s.max(axis=-1, keepdims=True)
    m = cupy.where(cupy.isneginf(m), 0.0, m)
    p = cupy.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    return cupy.matmul(p / cupy.where(den == 0, 1, den), v64), (m + cupy.log(den))[..., 0]


def part_correctness():
    rng = cupy.random.default_rng(5)
    ok = True
    cases = [("bf16 L=4096 H=2", BF16, 1, 2, 4096, 4096, 128, False, None),
             ("bf16 causal Lq=1000 Lk=1501 (odd pitch, tiles)", BF16, 2, 3, 1000, 1501, 64, True, None),
             ("bf16 bool mask Lk=16384 (512-thread register rows)", BF16, 1, 2, 40, 16384, 64, False, "bool"),
             ("bf16 Lk=16390 (row > registers: shared memory)", BF16, 1, 2, 40, 16390, 64, True, None),
             ("f32 bool mask Lk=70001 (row > smem: two-pass)", np.dtype(np.float32), 1, 2, 48, 70001, 32, False, "bool")]
    for name, dt, B, H, lq, lk, D, causal, mk in cases:
        q = rng.standard_normal((B, H, lq, D), dtype=cupy.float32)
        k = rng.standard_normal((B, H, lk, D), dtype=cupy.float32)
        v = rng.standard_normal((B, H, lk, D), dtype=cupy.float32)
        if dt == BF16:
            q, k, v = bf16(q), bf16(k), bf16(v)
        mask = None
        if mk == "bool":
            mask = rng.random((lq, lk)) < 0.7
            mask[3] = False                          # a fully masked row
        kw = {"causal": causal} if mask is None else {"causal": causal, "mask": mask}
        out, lse = cupyattn.attention(q, k, v, backend="chunked", return_lse=True, **kw)
        ref, ref_lse = _ref_f64(q, k, v, causal, mask)
        o64 = out.astype(cupy.float64)
        fin = cupy.isfinite(ref_lse)
        err = float(cupy.abs(o64 - ref).max() / cupy.abs(ref).max())
        lerr = float(cupy.abs(lse.astype(cupy.float64) - ref_lse)[fin].max()) if bool(fin.any()) else 0.0
        same_inf = bool(cupy.all(cupy.isneginf(lse) == ~fin))
        tol = 2e-2 if dt == BF16 else 1e-5
        good = err < tol and lerr < 1e-3 and same_inf and not bool(cupy.isnan(o64).any())
        ok &= good
        log(f"CHECK {'ok  ' if good else 'FAIL'} {name}: max rel err out {err:.2e} lse {lerr:.2e} -inf rows match {same_inf}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--softmax", action="store_true", help="only the softmax launch sweep")
    ap.add_argument("--causal", action="store_true", help="correctness, timing, then the causal row-tile sweep only")
    ap.add_argument("--budget", action="store_true", help="correctness, timing, then the workspace budget sweep only")
    args = ap.parse_args()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    log(f"GPU {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, "
        f"resident row limit {_chunked.resident_smem_limit(cupy.cuda.Device().id) // 1024} KB smem")
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except Exception:  # noqa: BLE001
        torch = None
    if args.softmax:
        part_softmax_sweep((4096, 16384))
        return
    if torch is None:
        log("torch not available: no comparison")
    ok = part_correctness()
    rows = []
    part_timing((4096,) if args.quick else (4096, 16384), torch, rows)
    if args.budget:
        part_budget_sweep((4096, 16384))
        return
    if not args.quick:
        part_budget_sweep((4096,))
    if args.causal or not args.quick:
        part_causal_sweep((4096,) if args.quick else (4096, 16384))
        if args.causal:
            return
    part_softmax_sweep((4096,) if args.quick else (4096, 16384))
    print("\n==== SUMMARY (bf16 D=128 H=16 B*L=16k; ratio = torch-eff ms / chunked ms, target fwd >= 0.6, fwdbwd >= 0.5)")
    by = {}
    for tag, op, c, t in rows:
        print(f"  {tag} {op:6} chunked {c:7.2f} ms" + (f"  torch-eff {t:7.2f} ms  ratio {t / c:.2f}" if t else ""))
        by[(tag.replace('causal=yes', 'causal=no '), tag.endswith('yes'), op)] = c
    for (tag, causal, op), c in by.items():
        if causal and (tag, False, op) in by:
            print(f"  causal/non-causal time {tag.split(' causal')[0]} {op}: {c / by[(tag, False, op)]:.2f} (target ~0.55)")
    print(f"  correctness: {'ok' if ok else 'FAILED'}   total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
