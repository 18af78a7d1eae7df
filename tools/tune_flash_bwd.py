"""Tune the flash backward main kernel on one GPU, in one call with a hard 120 s budget:

    PYTHONPATH=. python3 tools/tune_flash_bwd.py [--budget 120]

For head-dim widths 64, 128, 256 and up to 4 candidate configs each (the device's current default
first), flash_bwd_kernel<bf16, width, BLOCK_M, BLOCK_N, NWARPS, KW, CW, STAGES, false>:
1. compiles every candidate up front in parallel processes (CuPy's disk cache; ptxas registers,
   spills and stack frame from an offline compile for the device's arch in the same worker);
2. checks each candidate on 2 small cases (plain, and GQA + causal + odd D) against the float64
   reference with the tests' rule: err <= 3 x eager's err + tolerance(dtype), for dq, dk, dv;
3. times flash_backward alone (CUDA events, median of 5 after 2 warm-ups) at B*L = 16k tokens,
   L = 4096, H*D = 2048, bf16, not causal and causal. TFLOP/s = 2.5 x 4*B*H*L^2*D / time
   (halved for causal).
One line per (width, config); a BEST block at the end: the fastest passing config per width
(by the mean of its full and causal TFLOP/s). Past the budget the remaining steps are skipped.
Candidates are selected through _flash_bwd.CONFIG_OVERRIDE; nothing in the package is edited.
"""
from __future__ import annotations

import os
import sys
import time

T0 = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

BUDGET = 120.0
for i, a in enumerate(sys.argv):
    if a == "--budget" and i + 1 < len(sys.argv):
        BUDGET = float(sys.argv[i + 1])

# width -> candidate plans ((BLOCK_M, BLOCK_N, NWARPS, KW, CW), STAGES or None = as main_plan picks)
CANDIDATES = {
    64: [((64, 128, 8, 32, 32), None), ((64, 128, 8, 16, 32), None), ((128, 128, 8, 16, 16), None)],
    128: [((64, 128, 8, 16, 32), None), ((64, 64, 8, 32, 16), None), ((64, 128, 8, 16, 16), None)],
    256: [((64, 32, 8, 16, 16), 1), ((64, 64, 8, 16, 32), 2), ((64, 32, 8, 16, 16), 2)],
}
TOKENS, HD_TOTAL, L = 16384, 2048, 4096


def left():
    return BUDGET - (time.time() - T0)


def _short(plan):
    (bm, bn, nw, kw, cw), st = plan
    return f"BM={bm:<3} BN={bn:<3} W={nw} KW={kw} CW={cw} ST={st}"


def _compile_job(job):
    """Runs in a worker: CuPy's own build (warms the disk cache) + offline resource report."""
    name, = job
    from cupyattn._kernels import KernelSpec, compile_offline, get_function
    import cupy
    spec = KernelSpec("flash_bwd.cu", name)
    t = time.time()
    try:
        get_function(spec)
        err = ""
    except Exception as exc:  # noqa: BLE001
        err = f"{type(exc).__name__}: {str(exc)[:300]}"
    major, minor = map(int, cupy.cuda.Device().compute_capability)
    rep = compile_offline(spec, f"sm_{major}{minor}")
    return name, err, rep.registers, rep.spill_stores + rep.spill_loads, rep.stack_frame, time.time() - t


def plans_for(width, smem):
    from cupyattn import _flash_bwd as fb
    default = fb.main_plan(width, smem)
    out = [default]
    for config, st in CANDIDATES[width]:
        st = st or (2 if fb.main_bytes(config, 2, width) <= smem else 1)
        plan = (config, st)
        if plan not in out and fb.main_bytes(config, st, width) <= smem:
            out.append(plan)
    return out[:4]


def main():
    import numpy as np
    import cupy
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    import cupyattn
    from cupyattn import _flash_bwd as fb
    from cupyattn._layout import device_props
    from cupyattn._problem import BFLOAT16, normalize, normalize_backward, unbroadcast
    from reference import reference_backward, rel_error
    from strategies import Case, make_inputs, tolerance

    major, minor, smem, sms = device_props(cupy.cuda.Device().id)
    print(f"device {cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)['name'].decode()} "
          f"sm_{major}{minor} smem/block {smem} SMs {sms}; budget {BUDGET:.0f} s", flush=True)

    plans = {w: plans_for(w, smem) for w in CANDIDATES}
    names = {}
    for w, ps in plans.items():
        for p in ps:
            names[(w, p)] = fb.main_spec(BFLOAT16, w, False, plan=p).name

    # ---- 1. compile everything in parallel -----------------------------------------------------
    res = {}
    jobs = sorted(set(names.values()))
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 4),
                             mp_context=mp.get_context("spawn")) as pool:
        for name, err, regs, spill, stack, dt in pool.map(_compile_job, [(n,) for n in jobs]):
            res[name] = (err, regs, spill, stack)
    print(f"compiled {len(jobs)} instantiations in {time.time() - T0:.0f} s", flush=True)

    # ---- 2 + 3. per width: correctness then timing -----------------------------------------------
    def grads(inputs, case, dout, out, lse):
        problem = normalize(inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs))
        assert fb.backward_reasons(problem) == [], fb.backward_reasons(problem)
        d_int, o_int, l_int = normalize_backward(problem, dout, out, lse)
        dq, dk, dv = fb.flash_backward(problem, d_int, o_int, l_int)
        return tuple(unbroadcast(g, s, problem.has_head_axis).astype(problem.dtype)
                     for g, s in ((dq, problem.q_shape), (dk, problem.k_shape), (dv, problem.v_shape)))

    def check_cases(width):
        cases = [Case(batch=(1,), heads_q=2, heads_kv=2, len_q=200, len_k=331, head_dim=width,
                      head_dim_v=width, dtype=BFLOAT16, causal=False, seed=31),
                 Case(batch=(2,), heads_q=4, heads_kv=2, len_q=257, len_k=190, head_dim=width - 3,
                      head_dim_v=width - 3, dtype=BFLOAT16, causal=True, seed=32)]
        out = []
        for case in cases:
            inputs = make_inputs(cupy, case)
            o, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", return_lse=True,
                                        **case.kwargs(inputs))
            rng = np.random.default_rng(case.seed + 1)
            dout = cupy.asarray(rng.standard_normal(o.shape).astype(o.dtype))
            eager = cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], o, lse,
                                                backend="eager", **case.kwargs(inputs))
            refs, mags = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **case.kwargs(inputs),
                                            magnitudes=True)
            eager_err = [rel_error(e, r, magnitude=m) for e, r, m in zip(eager, refs, mags)]
            out.append((case, inputs, dout, o, lse, refs, mags, eager_err))
        return out

    def check(width, prepared):
        worst = 0.0
        for case, inputs, dout, o, lse, refs, mags, eager_err in prepared:
            gs = grads(inputs, case, dout, o, lse)
            for g, r, m, ee in zip(gs, refs, mags, eager_err):
                err = rel_error(g, r, magnitude=m)
                limit = 3 * ee + tolerance(case.dtype)
                if not err <= limit:
                    return False, f"err {err:.2e} > {limit:.2e} ({case.head_dim=}, {case.causal=})"
                worst = max(worst, err / limit)
        return True, f"err/limit<={worst:.2f}"

    def timing_inputs(width, causal, qkvd):
        b, h = TOKENS // L, HD_TOTAL // width
        q, k, v, dout = qkvd
        o, lse = cupyattn.attention(q, k, v, causal=causal, return_lse=True)
        problem = normalize(q, k, v, causal=causal)
        args = normalize_backward(problem, dout, o, lse)
        flops = 2.5 * 4 * b * h * L * L * width * (0.5 if causal else 1.0)
        return problem, args, flops

    def time_backward(problem, args):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        for _ in range(2):
            fb.flash_backward(problem, *args)
        ts = []
        for _ in range(5):
            start.record()
            fb.flash_backward(problem, *args)
            stop.record()
            stop.synchronize()
            ts.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return float(np.median(ts))

    results = {}
    for width in CANDIDATES:
        if left() < 5:
            print(f"W={width}: skipped (budget)", flush=True)
            continue
        try:
            prepared = check_cases(width)
            rng = np.random.default_rng(width)
            shape = (TOKENS // L, HD_TOTAL // width, L, width)
            qkvd = [cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16)) for _ in range(4)]
            timing = {c: timing_inputs(width, c, qkvd) for c in (False, True)}
        except Exception as exc:  # noqa: BLE001
            print(f"W={width}: setup failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        for idx, plan in enumerate(plans[width]):
            name = names[(width, plan)]
            err, regs, spill, stack = res.get(name, ("not compiled", None, 0, 0))
            tag = "default" if idx == 0 else "cand"
            head = f"W={width:<3} {_short(plan)} {tag:7} regs={regs} spill={spill} stack={stack}"
            if left() < 3:
                print(head + " SKIP (budget)", flush=True)
                continue
            if err:
                print(head + f" COMPILE-FAIL {err}", flush=True)
                continue
            fb.CONFIG_OVERRIDE[width] = plan
            try:
                ok, msg = check(width, prepared)
                tf = {}
                if ok:
                    for c in (False, True):
                        if left() < 2:
                            break
                        problem, args, flops = timing[c]
                        tf[c] = flops / time_backward(problem, args) / 1e12
            except Exception as exc:  # noqa: BLE001
                ok, msg, tf = False, f"{type(exc).__name__}: {str(exc)[:200]}", {}
            finally:
                fb.CONFIG_OVERRIDE.pop(width, None)
            cols = "  ".join(f"{'causal' if c else 'full'} {v:6.1f} TF" for c, v in tf.items())
            print(f"{head} {'PASS' if ok else 'FAIL'} {msg}  {cols}", flush=True)
            if ok and len(tf) == 2:
                results.setdefault(width, []).append((sum(tf.values()) / 2, plan, tf))
        del prepared, timing, qkvd
        cupy.get_default_memory_pool().free_all_blocks()

    print(f"\nBEST (bwd-only TFLOP/s, bf16, L={L}, B*L={TOKENS}, H*D={HD_TOTAL}; {time.time() - T0:.0f} s)")
    for width in CANDIDATES:
        if width not in results:
            print(f"  W={width}: no passing timed config")
            continue
        best = max(results[width], key=lambda r: r[0])
        default = next((r for r in results[width] if r[1] == plans[width][0]), None)
        gain = f" ({best[0] / default[0]:.2f}x default)" if default else ""
        print(f"  W={width}: {_short(best[1])}  full {best[2][False]:.1f}  causal {best[2][True]:.1f}{gain}")


if __name__ == "__main__":
    main()
