"""Flash backward on the GPU in one call: compile report, correctness sweep, fwd+bwd timing.

    PYTHONPATH=. python tools/flash_bwd_check.py [compile] [sweep] [speed]     (default: all three)

1. compile: every flash_bwd instantiation offline for sm_80 and sm_90a (regs, spills, stack), and,
   in the same process pool, the device's own build of every kernel the later steps launch (so
   CuPy's disk cache is warm and the sweep does not compile serially).
2. sweep: flash_backward (called directly, POISON_OUTPUTS on) against tests/reference.py with the
   rule err <= 3 x eager's err + tolerance(dtype) for dq, dk, dv; deterministic bit-equality.
3. speed: bf16 forward+backward TFLOP/s (3.5 x forward FLOPs 4*B*H*L^2*D, halved for causal), ours
   (flash forward + flash_backward + the casts to bf16 the API does) next to torch SDPA flash and
   cuDNN on the same inputs through DLPack. Tokens B*L = 16384, H*D = 2048.
The full compile table goes to $OUT/flash_bwd_compile.txt when $OUT is set.
"""
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np

T0 = time.time()
SUMMARY = []


def _job(job):
    kind, spec, arch = job
    if kind == "offline":
        from cupyattn._kernels import compile_offline
        r = compile_offline(spec, arch)
        return kind, spec, arch, (r.ok, r.registers, r.spill_stores + r.spill_loads, r.stack_frame, r.log if not r.ok else "")
    from cupyattn._kernels import get_function
    t = time.time()
    try:
        get_function(spec)
        return kind, spec, arch, (True, time.time() - t)
    except Exception as exc:  # noqa: BLE001
        return kind, spec, arch, (False, f"{type(exc).__name__}: {exc}"[:500])


def _short(name):
    name = name.replace("flash_bwd_", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return name.replace("_kernel", "")


def compile_step(speed_specs):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from cupyattn import _flash_bwd
    specs = _flash_bwd.kernel_specs()
    jobs = [("warm", s, None) for s in list(specs) + list(speed_specs)]
    jobs += [("offline", s, a) for s in specs for a in ("sm_80", "sm_90a")]
    table, bad, warm_bad = {}, 0, 0
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 4), mp_context=mp.get_context("spawn")) as pool:
        for kind, spec, arch, res in pool.map(_job, jobs):
            if kind == "warm":
                if not res[0]:
                    warm_bad += 1
                    print(f"WARM-FAIL {_short(spec.name)}: {res[1]}")
                continue
            ok, regs, spill, stack, log = res
            table.setdefault(spec.name, {})[arch] = (ok, regs, spill, stack)
            if not ok or spill or stack:
                bad += 1
                print(f"COMPILE-{'FAIL' if not ok else 'SPILL'} {arch} {spec.name}\n{log[-1500:]}")
    lines = []
    for spec in specs:
        cols = []
        for arch in ("sm_80", "sm_90a"):
            ok, regs, spill, stack = table[spec.name][arch]
            cols.append(f"{arch[3:]}:{regs}r" + ("" if ok and not spill and not stack else f"!sp{spill}st{stack}"))
        lines.append(f"  {_short(spec.name):44} {' '.join(cols)}")
    print("compile (regs per arch; ! = spill/stack):")
    print("\n".join(lines))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "flash_bwd_compile.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    msg = f"compile: {len(specs)} specs x 2 archs, {bad} failed/spilled; device warm-up failures {warm_bad} ({time.time() - T0:.0f}s)"
    print(msg, flush=True)
    SUMMARY.append(msg)


def sweep_step():
    import cupy
    import cupyattn
    from cupyattn import _flash_bwd
    from cupyattn._problem import normalize, normalize_backward, unbroadcast
    from reference import reference_backward, rel_error
    from strategies import BFLOAT16, Case, make_inputs, tolerance
    _flash_bwd.POISON_OUTPUTS = True
    F16 = np.dtype(np.float16)
    cases = []
    for i, ((lq, lk), d) in enumerate([((113, 203), 32), ((128, 217), 59), ((256, 512), 64), ((512, 256), 96),
                                       ((1, 239), 128), ((1023, 1024), 128), ((113, 203), 256), ((256, 512), 192),
                                       ((128, 217), 128), ((1023, 1024), 64), ((512, 256), 256), ((1, 239), 64)]):
        for dt in (F16, BFLOAT16):
            cases.append(Case(batch=(1,), heads_q=2, heads_kv=1 + (i % 2), len_q=lq, len_k=lk, head_dim=d,
                              head_dim_v=d, dtype=dt, causal=i % 3 != 0, seed=i))
    for mask in ("bool", "bias", "bool_empty_rows"):
        for d in (64, 128, 256):
            cases.append(Case(batch=(2,), heads_q=2, heads_kv=1, len_q=150, len_k=277, head_dim=d, head_dim_v=d,
                              dtype=BFLOAT16, causal=d == 128, mask=mask, seed=d))
    cases.append(Case(batch=(1,), heads_q=3, heads_kv=1, len_q=97, len_k=300, head_dim=40, head_dim_v=128,
                      dtype=F16, causal=True, seed=5))
    cases.append(Case(batch=(1,), heads_q=2, heads_kv=2, len_q=300, len_k=100, head_dim=64, head_dim_v=64,
                      dtype=F16, causal=True, seed=4))
    npass = nfail = 0
    for idx, case in enumerate(cases):
        inputs = make_inputs(cupy, case)
        kw = case.kwargs(inputs)
        fwd_backend = "flash" if idx % 4 == 0 else "eager"   # some cases through the flash forward too
        try:
            out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend=fwd_backend,
                                          return_lse=True, **kw)
        except Exception:  # noqa: BLE001 - flash forward unavailable: use eager
            fwd_backend = "eager"
            out, lse = cupyattn.attention(inputs["q"], inputs["k"], inputs["v"], backend="eager", return_lse=True, **kw)
        dout = cupy.asarray(np.random.default_rng(idx).standard_normal(out.shape).astype(out.dtype))
        refs, mags = reference_backward(dout, inputs["q"], inputs["k"], inputs["v"], **kw, magnitudes=True)
        eager = cupyattn.attention_backward(dout, inputs["q"], inputs["k"], inputs["v"], out, lse, backend="eager", **kw)
        problem = normalize(inputs["q"], inputs["k"], inputs["v"], **kw)
        args = normalize_backward(problem, dout, out, lse)
        reasons = _flash_bwd.backward_reasons(problem)
        modes = (False, True) if idx % 2 == 0 else (False,)
        for det in modes:
            try:
                raw = _flash_bwd.flash_backward(problem, *args, deterministic=det)
                cupy.cuda.Device().synchronize()
                grads = [unbroadcast(g, s, problem.has_head_axis).astype(problem.dtype)
                         for g, s in zip(raw, (problem.q_shape, problem.k_shape, problem.v_shape))]
                errs = [(rel_error(g, r, magnitude=m), rel_error(e, r, magnitude=m))
                        for g, e, r, m in zip(grads, eager, refs, mags)]
                ok = all(a <= 3 * b + tolerance(case.dtype) for a, b in errs) and not reasons
                if det:
                    again = _flash_bwd.flash_backward(problem, *args, deterministic=True)
                    same = all(bool(cupy.array_equal(a.view(np.uint32), b.view(np.uint32))) for a, b in zip(raw, again))
                    ok = ok and same
                detail = " ".join(f"d{n}={a:.1e}/{b:.1e}" for n, (a, b) in zip("qkv", errs))
                if det:
                    detail += f" bits={'same' if same else 'DIFFER'}"
            except Exception as exc:  # noqa: BLE001
                ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
            npass += ok
            nfail += not ok
            print(f"{'PASS' if ok else 'FAIL'} {np.dtype(case.dtype).name[:4]} {case.len_q}x{case.len_k} "
                  f"d{case.head_dim}/{case.head_dim_v} g{case.heads_q // case.heads_kv} c{int(case.causal)} "
                  f"m={case.mask} {'det' if det else 'atom'} fwd={fwd_backend[:2]} {detail}", flush=True)
    msg = f"sweep: {npass} PASS, {nfail} FAIL ({time.time() - T0:.0f}s)"
    print(msg, flush=True)
    SUMMARY.append(msg)
    _flash_bwd.POISON_OUTPUTS = False


def _speed_specs():
    try:   # the forward's kernels, warmed in the same pool (its helper may change: best effort)
        from cupyattn import _flash
        from cupyattn._problem import BFLOAT16
        return [_flash.forward_spec(BFLOAT16, w, None) for w in (64, 128)]
    except Exception:  # noqa: BLE001
        return []


def speed_step():
    import cupy
    import cupyattn
    from cupyattn import _flash_bwd
    from cupyattn._problem import normalize
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        have_torch = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        print(f"torch unavailable: {exc}")
        have_torch = False

    def timeit(fn, reps):
        fn()
        cupy.cuda.Device().synchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / reps

    rows = []
    for d in (64, 128):
        for L in (1024, 4096, 16384):
            for causal in (False, True):
                B, H = 16384 // L, 2048 // d
                bf = cupyattn.bfloat16
                q, k, v, dout = (cupy.random.standard_normal((B, H, L, d), dtype=np.float32).astype(bf) for _ in range(4))
                flops = 4 * B * H * L * L * d / (2 if causal else 1)
                reps = 3 if L == 16384 else 5
                res = {}

                def ours(det=False):
                    out, lse = cupyattn.attention(q, k, v, causal=causal, backend="flash", return_lse=True)
                    problem = normalize(q, k, v, causal=causal)
                    grads = _flash_bwd.flash_backward(problem, dout, out, lse, deterministic=det)
                    return [g.astype(bf) for g in grads]

                try:
                    t_fwd = timeit(lambda: cupyattn.attention(q, k, v, causal=causal, backend="flash", return_lse=True), reps)
                    t_all = timeit(ours, reps)
                    t_det = timeit(lambda: ours(True), reps) if L == 4096 else float("nan")
                    res["ours"] = 3.5 * flops / t_all / 1e9
                    res["fwd"] = flops / t_fwd / 1e9
                    res["bwd"] = 2.5 * flops / (t_all - t_fwd) / 1e9
                    res["det"] = 3.5 * flops / t_det / 1e9
                except Exception as exc:  # noqa: BLE001
                    print(f"ours failed D={d} L={L} causal={causal}: {type(exc).__name__}: {str(exc)[:300]}")
                if have_torch:
                    tq, tk, tv = (torch.from_dlpack(a).requires_grad_() for a in (q, k, v))
                    tdo = torch.from_dlpack(dout)
                    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        def step():
                            tq.grad = tk.grad = tv.grad = None
                            with sdpa_kernel(be):
                                o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                            o.backward(tdo)
                        try:
                            res[name] = 3.5 * flops / timeit(step, reps) / 1e9
                        except Exception as exc:  # noqa: BLE001
                            print(f"torch {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    del tq, tk, tv, tdo
                ratio = res.get("ours", float("nan")) / res.get("flash", float("nan")) if "flash" in res else float("nan")
                line = (f"D={d:3} L={L:5} causal={int(causal)}: ours {res.get('ours', float('nan')):6.1f} "
                        f"(fwd {res.get('fwd', float('nan')):5.1f} bwd {res.get('bwd', float('nan')):5.1f} "
                        f"det {res.get('det', float('nan')):5.1f}) torch-flash {res.get('flash', float('nan')):6.1f} "
                        f"cudnn {res.get('cudnn', float('nan')):6.1f} TFLOP/s  ours/flash {ratio:4.2f}")
                print(line, flush=True)
                rows.append(line)
                del q, k, v, dout
                cupy.get_default_memory_pool().free_all_blocks()
    SUMMARY.append("speed (bf16 fwd+bwd, TFLOP/s):\n" + "\n".join("  " + r for r in rows))


if __name__ == "__main__":
    steps = sys.argv[1:] or ["compile", "sweep", "speed"]
    import cupy
    print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), flush=True)
    if "compile" in steps:
        compile_step(_speed_specs() if "speed" in steps else [])
    if "sweep" in steps:
        sweep_step()
    if "speed" in steps:
        speed_step()
    print("==== summary")
    print("\n".join(SUMMARY))
    print(f"total {time.time() - T0:.0f}s")
