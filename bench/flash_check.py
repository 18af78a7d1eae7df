"""Flash backend checks.

  python bench/flash_check.py compile      # compile every flash instantiation for sm_80 and sm_90a (no GPU needed)
  python bench/flash_check.py smoke        # GPU: a few cases against the float64 reference
  python bench/flash_check.py speed        # GPU: forward TFLOP/s at a few sizes
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np


def _compile_one(spec_arch):
    from cupyattn._kernels import compile_offline
    return compile_offline(*spec_arch)


def compile_all(archs=("sm_80", "sm_90a")):
    from concurrent.futures import ProcessPoolExecutor   # NVRTC's lazy library loading races in threads
    from cupyattn._flash import FlashBackend
    jobs = [(s, a) for s in FlashBackend().kernel_specs() for a in archs]
    bad = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for r in pool.map(_compile_one, jobs):
            print(r.line(), flush=True)
            if not r.ok or r.spills:
                bad += 1
                print(r.log[-2000:])
    print(f"{len(jobs)} compiles, {bad} failed or spilled")
    return bad


def smoke():
    import cupy
    import cupyattn
    from cupyattn import _flash
    from reference import reference_attention, rel_error
    _flash.POISON_OUTPUTS = True
    rng = np.random.default_rng(0)
    for dt in (np.float16, cupyattn.bfloat16):
        for (b, hq, hkv, lq, lk, d, dv, causal) in [(2, 4, 2, 113, 203, 64, 64, False),
                                                     (1, 2, 1, 128, 217, 128, 128, True),
                                                     (1, 2, 2, 1, 4096, 128, 128, False),
                                                     (1, 4, 1, 3, 799, 59, 40, True),
                                                     (1, 1, 1, 256, 512, 256, 200, True)]:
            q = rng.standard_normal((b, hq, lq, d)).astype(dt)
            k = rng.standard_normal((b, hkv, lk, d)).astype(dt)
            v = rng.standard_normal((b, hkv, lk, dv)).astype(dt)
            out, lse = cupyattn.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), causal=causal,
                                          backend="flash", return_lse=True)
            ro, rl = reference_attention(q, k, v, causal=causal)
            print(f"{np.dtype(dt).name:8} b{b} hq{hq} hkv{hkv} lq{lq} lk{lk} d{d} dv{dv} causal={causal}: "
                  f"out err {rel_error(out, ro):.2e} lse err {rel_error(lse, rl):.2e}")


def speed():
    import cupy
    import cupyattn
    for d in (64, 128, 256):
        for L in (1024, 4096, 16384):
            for causal in (False, True):
                B, H = 16384 // L, 2048 // d
                q = cupy.random.standard_normal((B, H, L, d), dtype=np.float32).astype(cupyattn.bfloat16)
                k = cupy.random.standard_normal((B, H, L, d), dtype=np.float32).astype(cupyattn.bfloat16)
                v = cupy.random.standard_normal((B, H, L, d), dtype=np.float32).astype(cupyattn.bfloat16)
                f = lambda: cupyattn.attention(q, k, v, causal=causal, backend="flash")
                f()
                cupy.cuda.Device().synchronize()
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                n = 10
                start.record()
                for _ in range(n):
                    f()
                stop.record()
                stop.synchronize()
                ms = cupy.cuda.get_elapsed_time(start, stop) / n
                flops = 4 * B * H * L * L * d / (2 if causal else 1)
                print(f"D={d:3} L={L:5} causal={causal!s:5}: {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    # decode
    B, Hq, Hkv, Lk, d = 8, 32, 8, 32768, 128
    q = cupy.random.standard_normal((B, Hq, 1, d), dtype=np.float32).astype(cupyattn.bfloat16)
    k = cupy.random.standard_normal((B, Hkv, Lk, d), dtype=np.float32).astype(cupyattn.bfloat16)
    v = cupy.random.standard_normal((B, Hkv, Lk, d), dtype=np.float32).astype(cupyattn.bfloat16)
    f = lambda: cupyattn.attention(q, k, v, backend="flash")
    f()
    print(cupyattn.explain(q, k, v, backend="flash"))
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(20):
        f()
    stop.record()
    stop.synchronize()
    ms = cupy.cuda.get_elapsed_time(start, stop) / 20
    print(f"decode: {ms:.3f} ms, {2 * k.nbytes / ms / 1e6:.0f} GB/s of K/V")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "compile"
    if what == "compile":
        sys.exit(1 if compile_all() else 0)
    elif what == "smoke":
        smoke()
    elif what == "speed":
        speed()
