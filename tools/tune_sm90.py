"""Compare the launch variants of the Hopper flash forward kernel on one H100/H200 in one call:

    PYTHONPATH=. python3 tools/tune_sm90.py            # compile, check, time every variant; BEST block
    PYTHONPATH=. python3 tools/tune_sm90.py --variants dynamic,static   # a subset

The variants are the grids the kernel runs with (`_flash_sm90.GRIDS`): "dynamic" and "static" (one
block per SM, drawing tiles on demand or by a fixed stride) and "per-tile" (one block per tile);
`_flash_sm90.grid_kind` encodes which one wins where.
(This script also chose the consumer schedule on 2026-11-28: ping-pong between the consumer
warpgroups plus intra-warpgroup overlap beat the plain loop and the other schedules, which were
then removed from the kernel.)

Budget: about 150 s in all. Steps:
 1. compile every instantiation of every variant in parallel processes: ptxas report (registers,
    stack, spills, C7508 "setmaxnreg ignored", wgmma serialisation) and CuPy's disk cache warmed;
 2. per variant, in its own child process with a time limit (a hung or crashing variant is
    discarded, the others still report): ~14 mixed correctness cases against a float64 reference
    computed on the GPU (eager in float64), poisoned outputs, identical bits on repeat; then, only
    if all pass, the timing rows (bf16, B*L = 16k tokens, H*D = 2048; D 64/128/256, L 1k/4k/16k,
    causal and not; CUDA events, median of 10 after warm-up);
 3. torch SDPA with cuDNN on the same inputs (DLPack), in its own child (skipped if torch is missing);
 4. the table and a BEST block: per (D, L, mask) the fastest passing variant and its ratio to cuDNN.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

BUDGET_S = 150.0
LENGTHS = (1024, 4096, 16384)
HEAD_DIMS = (64, 128, 256)
TOKENS, WIDTH = 16384, 2048   # B * L and H * D of the timing rows


# ---------------------------------------------------------------------------------------------
# 1. compile

def _compile_one(spec):
    from cupyattn._kernels import compile_offline, get_function
    t0 = time.time()
    rep = compile_offline(spec, "sm_90a")
    flags = []
    if "C7508" in rep.log or ("setmaxnreg" in rep.log and "ignored" in rep.log):
        flags.append("C7508")
    if "serializ" in rep.log or "C7510" in rep.log or "C7509" in rep.log:
        flags.append("wgmma-serialized")
    warm = ""
    try:   # CuPy's own compile with the same options -> its disk cache, the children load at once
        get_function(spec)
    except Exception as exc:  # noqa: BLE001
        warm = f" warm failed: {type(exc).__name__}: {str(exc)[:120]}"
    ok = rep.ok and not rep.spills and not flags and not warm
    return spec.name, ok, f"{rep.line()} {time.time() - t0:.0f}s {' '.join(flags)}{warm}"


GRIDS = ("dynamic", "static", "per-tile")


def parse_variant(variant):
    """(grid name or None for the per-problem choice, {head dim: (BN, STAGES, CONSUMERS)} override).

    A variant is a grid name (GRIDS) or a tile configuration written
    cfg<D>x<BN>x<STAGES>[x<CONSUMERS>] (e.g. cfg128x176x2, cfg64x128x4x3; two consumer warpgroups
    when not given), optionally +dynamic / +static / +per-tile; a configuration variant is checked
    and timed at its own head dim only."""
    from cupyattn import _flash_sm90
    if variant in GRIDS:
        return variant, {}
    cfg, _, grid = variant.partition("+")
    d, *tiles = (int(x) for x in cfg[len("cfg"):].split("x"))
    return (grid or None), {d: _flash_sm90.full_config(tiles)}


def apply_variant(variant):
    """Install the variant's configuration in this process; returns (grid, head dims to run)."""
    from cupyattn import _flash_sm90
    grid, override = parse_variant(variant)
    _flash_sm90.CONFIGS.update(override)
    for d in override:     # the variant's tiles at every length
        _flash_sm90.LONG_CONFIGS.pop(d, None)
    return grid, (tuple(override) or HEAD_DIMS)


def step_compile(variants):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    from cupyattn import _flash_sm90
    specs = _flash_sm90.kernel_specs()
    for v in variants:   # tile configurations beyond the defaults
        for d, cfg in parse_variant(v)[1].items():
            for dt in (_flash_sm90.FLOAT16, _flash_sm90.BFLOAT16):
                if _flash_sm90.spec_for(dt, d, cfg) not in specs:
                    specs.append(_flash_sm90.spec_for(dt, d, cfg))
    status = {}
    workers = max(1, min(len(specs), os.cpu_count() or 4, 16))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for name, ok, line in pool.map(_compile_one, specs):
            status[name] = ok
            print(("COMPILE ok  " if ok else "COMPILE BAD ") + line, flush=True)
    smem = [_flash_sm90.smem_bytes(d, c) for d in _flash_sm90.HEAD_DIMS for c in _flash_sm90.configs(d)]
    print(f"CONFIGS {_flash_sm90.CONFIGS} LONG_CONFIGS {_flash_sm90.LONG_CONFIGS} smem={smem}", flush=True)
    # the grids run the same instantiations: one bad default compile rules them all out
    bad = []
    for v in variants:
        over = parse_variant(v)[1]
        names = [n for n in status if not over or n in {_flash_sm90.kernel_name(dt, d, cfg) for d, cfg in over.items()
                                                         for dt in (_flash_sm90.FLOAT16, _flash_sm90.BFLOAT16)}]
        if not all(status[n] for n in names):
            bad.append(v)
    return bad


# ---------------------------------------------------------------------------------------------
# 2. one variant: correctness, then timing (child process)

def _cases():
    """(Lq, Lk, D, causal, hq, hkv, batch, dtype, layout, scale)"""
    from cupyattn._problem import BFLOAT16, FLOAT16
    return [
        (113, 203, 64, False, 4, 4, 2, BFLOAT16, "bhld", None),
        (128, 217, 128, True, 4, 1, 2, FLOAT16, "bhld", None),
        (1, 239, 256, True, 4, 2, 2, BFLOAT16, "bhld", None),
        (512, 256, 64, True, 4, 4, 1, FLOAT16, "bhld", None),      # Lq > Lk: rows that see nothing
        (1023, 1024, 128, False, 4, 2, 1, BFLOAT16, "bhld", None),
        (300, 333, 256, False, 4, 2, 2, FLOAT16, "blhd", None),    # (B, L, H, D) storage
        (2048, 2048, 128, True, 4, 4, 1, BFLOAT16, "bhld", None),
        (777, 1500, 64, True, 8, 2, 1, BFLOAT16, "bhld", -0.2),    # negative scale
        (200, 250, 128, False, 4, 2, 3, BFLOAT16, "kvbcast", None),  # K/V broadcast over batch
        (1000, 700, 256, True, 4, 4, 1, BFLOAT16, "bhld", 0.05),
        (300, 310, 64, True, 8, 2, 37, FLOAT16, "bhld", None),     # 888 tiles: persistent blocks loop
        (2000, 2100, 128, True, 16, 4, 4, BFLOAT16, "bhld", None), # 1024 tiles, partial m-block
        (640, 640, 256, False, 16, 16, 2, FLOAT16, "bhld", None),  # 160 tiles
        (4096, 4096, 64, False, 2, 1, 1, BFLOAT16, "bhld", None),
    ]


def _make_case(rng, lq, lk, d, hq, hkv, b, dt, layout):
    import cupy
    import numpy as np

    def randn(shape):
        return cupy.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dt)
    q = randn((b, hq, lq, d))
    if layout == "blhd":
        q = randn((b, lq, hq, d)).transpose(0, 2, 1, 3)
        k = randn((b, lk, hkv, d)).transpose(0, 2, 1, 3)
        v = randn((b, lk, hkv, d)).transpose(0, 2, 1, 3)
    elif layout == "kvbcast":
        k = cupy.broadcast_to(randn((1, hkv, lk, d)), (b, hkv, lk, d))
        v = cupy.broadcast_to(randn((1, hkv, lk, d)), (b, hkv, lk, d))
    else:
        k = randn((b, hkv, lk, d))
        v = randn((b, hkv, lk, d))
    return q, k, v


def _rel(a, ref):
    import cupy
    a = a.astype(cupy.float64)
    return float(cupy.linalg.norm(a - ref) / max(float(cupy.linalg.norm(ref)), 1e-300))


def child_check(variant):
    import cupy
    import numpy as np
    import cupyattn
    from cupyattn import _flash_sm90
    from cupyattn._problem import normalize, dtype_name
    from strategies import tolerance

    rng = np.random.default_rng(0)
    npass = nfail = 0
    worst = 0.0
    grid, dims = apply_variant(variant)
    for (lq, lk, d, causal, hq, hkv, b, dt, layout, scale) in _cases():
        if d not in dims:
            continue
        name = (f"Lq={lq} Lk={lk} D={d} {'causal' if causal else 'full'} h={hq}/{hkv} B={b} "
                f"{dtype_name(dt)} {layout}{'' if scale is None else f' scale={scale}'}")
        try:
            q, k, v = _make_case(rng, lq, lk, d, hq, hkv, b, dt, layout)
            problem = normalize(q, k, v, causal=causal, scale=scale)
            why = _flash_sm90.supports(problem)
            if why:
                raise RuntimeError(f"supports(): {why}")
            out, lse = _flash_sm90.forward(problem, poison=True, grid=grid)
            out2, lse2 = _flash_sm90.forward(problem, poison=True, grid=grid)
            cupy.cuda.runtime.deviceSynchronize()
            q64, k64, v64 = (cupy.ascontiguousarray(a).astype(cupy.float64) for a in (q, k, v))
            ref_out, ref_lse = cupyattn.attention(q64, k64, v64, causal=causal, scale=scale,
                                                  backend="eager", return_lse=True)
            eager = cupyattn.attention(q, k, v, causal=causal, scale=scale, backend="eager")
            nan = bool(cupy.isnan(out).any()) or bool(cupy.isnan(lse).any())
            err, eager_err = _rel(out, ref_out), _rel(eager, ref_out)
            allowed = 2.0 * eager_err + tolerance(dt)
            hidden = cupy.isneginf(ref_lse)
            lse_pattern = bool((cupy.isneginf(lse) == hidden).all())
            hidden_zero = bool((out.astype(cupy.float32)[hidden] == 0).all()) if bool(hidden.any()) else True
            seen = ~hidden
            lse_err = float((cupy.abs(lse.astype(cupy.float64) - ref_lse)[seen] /
                             cupy.maximum(1.0, cupy.abs(ref_lse[seen]))).max()) if bool(seen.any()) else 0.0
            same = bool((out.view(cupy.uint16) == out2.view(cupy.uint16)).all()) and \
                bool((lse.view(cupy.uint32) == lse2.view(cupy.uint32)).all())
            ok = (not nan) and err <= allowed and lse_pattern and hidden_zero and lse_err <= 2e-3 and same
            worst = max(worst, err / allowed if allowed > 0 else 0.0)
            detail = (f"err={err:.2e} allowed={allowed:.2e} lse_err={lse_err:.1e}" +
                      ("" if ok else f" nan={nan} lse_pattern={lse_pattern} hidden_zero={hidden_zero} same_bits={same}"))
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"{'PASS' if ok else 'FAIL'} {variant} {name} {detail}", flush=True)
        npass += ok
        nfail += not ok
    print(f"CHECK {variant} {npass} pass {nfail} fail worst_err/allowed={worst:.2f}", flush=True)
    return nfail == 0


def _median_ms(fn, iters=10, warmup=2):
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    times.sort()
    return times[len(times) // 2]


def _timing_inputs(L, d):
    import cupy
    import numpy as np
    from cupyattn._problem import BFLOAT16
    cupy.random.seed(L * 1000 + d)
    b, h = TOKENS // L, WIDTH // d
    return [cupy.random.standard_normal((b, h, L, d), dtype=np.float32).astype(BFLOAT16) for _ in range(3)]


def _flops(L, d, causal):
    b, h = TOKENS // L, WIDTH // d
    return 4.0 * b * h * L * L * d / (2 if causal else 1)


def child_time(variant):
    import cupy
    from cupyattn import _flash_sm90
    from cupyattn._problem import normalize
    grid, dims = apply_variant(variant)
    for L in LENGTHS:
        for d in dims:
            q, k, v = _timing_inputs(L, d)
            for causal in (False, True):
                problem = normalize(q, k, v, causal=causal)
                try:
                    ms = _median_ms(lambda: _flash_sm90.forward(problem, poison=False, grid=grid))
                    print(f"ROW {variant} {L} {d} {int(causal)} {ms:.5f}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"ROWFAIL {variant} {L} {d} {int(causal)} {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            del q, k, v
            cupy.get_default_memory_pool().free_all_blocks()


def child_torch():
    import cupy
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as exc:  # noqa: BLE001
        print(f"NOTORCH {type(exc).__name__}: {exc}", flush=True)
        return
    for L in LENGTHS:
        for d in HEAD_DIMS:
            q, k, v = _timing_inputs(L, d)
            tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))
            for causal in (False, True):
                try:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        ms = _median_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))
                    print(f"ROW cudnn {L} {d} {int(causal)} {ms:.5f}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"ROWFAIL cudnn {L} {d} {int(causal)} {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            q = k = v = tq = tk = tv = None
            cupy.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------------------------

def _run_child(args, limit):
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    try:
        out, _ = proc.communicate(timeout=max(limit, 1.0))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = f"TIMEOUT after {limit:.0f}s (hung kernel?)"
    return rc, out or "", time.time() - t0


def main():
    args = sys.argv[1:]
    if args and args[0] == "--child":
        kind = args[1]
        if kind == "variant":
            if child_check(args[2]):
                child_time(args[2])
        elif kind == "torch":
            child_torch()
        return

    t_start = time.time()
    variants = list(GRIDS)
    if "--variants" in args:
        variants = [v for v in args[args.index("--variants") + 1].split(",") if v]
    deadline = t_start + BUDGET_S - 5

    print("===== compile =====", flush=True)
    try:
        bad = step_compile(variants)
    except Exception as exc:  # noqa: BLE001
        print(f"compile step failed: {type(exc).__name__}: {exc}", flush=True)
        bad = []
    print(f"compile: {time.time() - t_start:.0f}s; not clean: {bad or 'none'}", flush=True)

    times = {}      # (who, L, d, causal) -> ms
    status = {}     # variant -> text
    todo = [v for v in variants]
    jobs = [("torch", None)] + [("variant", v) for v in todo]
    for i, (kind, v) in enumerate(jobs):
        left = deadline - time.time()
        remaining = len(jobs) - i
        limit = min(30.0, max(left / remaining * 1.6, 5.0), left)
        if left < 4:
            status[v or "cudnn"] = "skipped (budget)"
            continue
        rc, out, took = _run_child(["--child", kind] + ([v] if v else []), limit)
        who = v or "cudnn"
        lines = out.splitlines()
        for line in lines:
            parts = line.split()
            if parts and parts[0] == "ROW":
                times[(parts[1], int(parts[2]), int(parts[3]), bool(int(parts[4])))] = float(parts[5])
        fails = [l for l in lines if l.startswith(("FAIL", "ROWFAIL"))]
        summary = [l for l in lines if l.startswith(("CHECK", "NOTORCH"))]
        print(f"===== {who}: rc={rc} {took:.0f}s =====", flush=True)
        for l in summary + fails[:6]:
            print("  " + l[:220], flush=True)
        if rc != 0:
            print("  last output: " + " / ".join(lines[-4:])[:600], flush=True)
        passed = any(l.startswith("CHECK") and " 0 fail" in l for l in lines)
        if kind == "variant":
            status[v] = ("PASS" if passed else "FAIL") + ("" if rc == 0 else f" rc={rc}") + \
                (" compile-not-clean" if v in bad else "")

    # ---- table --------------------------------------------------------------------------------
    shown = [v for v in variants if any(k[0] == v for k in times)]
    print("\n===================== TFLOP/s (bf16, B*L=16k, H*D=2048) =====================")
    print(f"{'L':>6} {'D':>4} {'mask':>6} " + " ".join(f"{v[:14]:>14}" for v in shown) + f" {'cudnn':>7}")
    best_rows = []
    for L in LENGTHS:
        for d in HEAD_DIMS:
            for causal in (False, True):
                fl = _flops(L, d, causal)
                tf = {}
                for who in shown + ["cudnn"]:
                    ms = times.get((who, L, d, causal))
                    tf[who] = fl / (ms * 1e-3) / 1e12 if ms else None
                cells = " ".join(f"{tf[v]:14.1f}" if tf[v] else f"{'n/a':>14}" for v in shown)
                c = tf["cudnn"]
                print(f"{L:6d} {d:4d} {'causal' if causal else 'full':>6} {cells} "
                      f"{c:7.1f}" if c else f"{L:6d} {d:4d} {'causal' if causal else 'full':>6} {cells} {'n/a':>7}")
                ok = [(tf[v], v) for v in shown if tf[v] and status.get(v, "").startswith("PASS")]
                if ok:
                    best, who = max(ok)
                    base = tf.get("per-tile")
                    best_rows.append((L, d, causal, who, best, c, base))
    print("\n===================== STATUS =====================")
    for v in variants:
        print(f"  {v:20s} {status.get(v, 'not run')}")
    print("\n===================== BEST =====================")
    print(f"{'L':>6} {'D':>4} {'mask':>6} {'best variant':>20} {'TFLOP/s':>8} {'cudnn':>7} {'ratio':>6} {'vs per-tile':>11}")
    for L, d, causal, who, best, c, base in best_rows:
        ratio = f"{best / c:6.2f}" if c else "   n/a"
        vs = f"{best / base:8.2f}" if base else "     n/a"
        print(f"{L:6d} {d:4d} {'causal' if causal else 'full':>6} {who:>20} {best:8.1f} "
              f"{c if c else float('nan'):7.1f} {ratio} {vs}")
    try:
        import cupy
        p = cupy.cuda.runtime.getDeviceProperties(0)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    except Exception:  # noqa: BLE001
        name = "?"
    print(f"device: {name}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
