"""A/B timing of Hopper forward kernel sources and grids in one process, interleaved: every round
times every variant (and torch's cuDNN) on a row, so clock drift on the card hits all alike.

    git show <rev>:kernels_cu/flash_fwd_sm90.cu > kernels_cu/ab_old.cu    # here, before the call
    PYTHONPATH=. python3 tools/ab_sm90.py ab_old.cu:static                  # on the device

(kernels_cu/ab_*.cu is git-ignored: name the file in the device call's carry.) AB_ROWS in the
environment replaces the rows: "D:L:CFG[:H],...", where L is a length or LQ/LK (queries / keys,
timed full only), H the number of heads (default 2048 / D; e.g. 33 instead of 16 gives a tile count
that is a whole number of waves on 132 SMs) and CFG is BNxSTAGES (two consumer warpgroups) or BNxSTAGESxCONSUMERS, or several of
them separated by "|" to time those configurations of the current source against each other in
the same rounds, e.g.
    AB_ROWS="64:4096:128x4|128x4x3,64:16384:192x3|128x4x3"
AB_GRIDS="dynamic,per-tile" picks the grids the current source runs with (all of GRIDS by default);
AB_SWIZZLE="0,4,8" also times it with those (batch, head) swizzle widths (_flash_sm90.SWIZZLE_WIDTH;
0 = the default rule, K and V of a group in half of L2), labelled ".../sw<N>".

Variants: the current source with each grid of _flash_sm90.GRIDS and each configuration of the
row ("cur/<grid>", or "cur/<grid>/<CFG>" when the row names several), and each source named on the
command line (a file in kernels_cu/, taking the current launch arguments; trailing ones it does
not declare are ignored) with the dynamic grid, or the grid named after a colon ("ab_old.cu:static";
a source older than the dynamic scheduler has only the static and per-tile grids), with the row's
first configuration (a source from before the consumer-count parameter has two consumers only).
Each variant's output is checked against the first's before timing; one that differs is reported
(MISMATCH) and left out of that row's timing. Prints TFLOP/s (bf16,
B*L = 16k tokens, H*D = 2048 unless the row names H) and the ratio to cuDNN."""
import os
import sys
import time

import numpy as np
import cupy

sys.path.insert(0, ".")
sys.path.insert(0, "bench")
import _common as bench_timer  # noqa: E402  (bench/_common.py: AB_BURST times with the bench's timer)
import cupyattn  # noqa: E402
from cupyattn import _flash_sm90  # noqa: E402
from cupyattn._problem import normalize  # noqa: E402

bf = np.dtype(cupyattn.bfloat16)
def _extra(arg):
    """'ab_next.cu' (the dynamic grid) or 'ab_old.cu:static' (a grid of GRIDS)."""
    src, _, grid = arg.partition(":")
    grid = grid or "dynamic"
    return f"{src.rsplit('.', 1)[0]}/{grid}", src, grid


def cfg_label(cfg):
    """BNxSTAGES for two consumer warpgroups (the old label), BNxSTAGESxCONSUMERS otherwise."""
    cfg = _flash_sm90.full_config(cfg)
    return "x".join(map(str, cfg if cfg[2] != _flash_sm90.DEFAULT_CONSUMERS else cfg[:2]))


def parse_rows(text):
    """'D:L:CFG[|CFG...][:H],...' -> [(D, (Lq, Lk), [(BN, STAGES, CONSUMERS), ...], H)]; L is one
    length or LQ/LK (queries / keys, timed without the causal mask: torch's is_causal aligns
    top-left); H, the number of heads, defaults to 2048 / D."""
    rows = []
    for r in text.split(","):
        d, n, cfgs, *heads = r.strip().split(":")
        lq, _, lk = n.partition("/")
        rows.append((int(d), (int(lq), int(lk or lq)),
                     [_flash_sm90.full_config(int(x) for x in c.split("x")) for c in cfgs.split("|")],
                     int(heads[0]) if heads else 2048 // int(d)))
    return rows


def row_variants(cfgs, extra):
    """(name, source, grid, config, swizzle) of every variant timed on a row with configurations
    `cfgs` (swizzle: SWIZZLE_WIDTH, None = the default rule), then the `extra` sources."""
    cur = [(f"cur/{g}" + (f"/{cfg_label(c)}" if len(cfgs) > 1 else "") + (f"/sw{w}" if w else ""),
            CURRENT_SOURCE, g, c, w)
           for g in GRIDS for c in cfgs for w in SWIZZLES]
    return cur + [(name + (f"/sw{EXTRA_SWIZZLE}" if EXTRA_SWIZZLE else ""), src, grid, cfgs[0], EXTRA_SWIZZLE)
                  for name, src, grid in extra]


# the source the package ships, read once: fn_for sets _flash_sm90.SOURCE on every call, so after a
# row it names whichever variant ran last (reading it per row once timed ab_noepi as "cur")
CURRENT_SOURCE = _flash_sm90.SOURCE
GRIDS = os.environ.get("AB_GRIDS", ",".join(_flash_sm90.GRIDS)).split(",")
# AB_UNCHECKED="ab_noepi/dynamic,...": variants timed without checking their output (measurement
# variants that skip work on purpose, e.g. the epilogue's stores)
UNCHECKED = set(filter(None, os.environ.get("AB_UNCHECKED", "").split(",")))
# AB_SWIZZLE="0,2,4": the current source also with these (batch, head) swizzle widths
# (_flash_sm90.SWIZZLE_WIDTH; 0 = the default rule, half of L2)
SWIZZLES = [int(w) or None for w in os.environ.get("AB_SWIZZLE", "0").split(",")]
# AB_EXTRA_SWIZZLE=N: the sources named on the command line run with swizzle width N (default: the rule)
EXTRA_SWIZZLE = int(os.environ.get("AB_EXTRA_SWIZZLE", "0")) or None
# (D, (Lq, Lk), [config]): the default tiles at 1k, 4k and 16k, then 4k queries against 16k keys
# (a 4k row's tile count with a 16k row's keys per tile: does the 4k rows' loss come per tile?)
DEFAULT_ROWS = ("64:1024:128x4x3,128:1024:128x2,64:4096:128x4x3,128:4096:128x2,256:4096:64x2,"
                "64:16384:128x4x3,128:16384:176x2,256:16384:64x2,"
                "128:4096/16384:176x2,256:4096/16384:64x2")
ROUNDS = int(os.environ.get("AB_ROUNDS", "7"))
# AB_BURST=N: time like bench/attention.py instead of under sustained load: N launches a variant a
# round through the bench's timer (each between its own pair of events, median), the card
# synchronised and left idle for AB_PAUSE_MS between variants. The sustained A/B runs the card
# hotter and its clocks lower (1.66 GHz under ncu against up to 1.98), which moves the weight of
# memory latency against math.
BURST = int(os.environ.get("AB_BURST", "0"))
PAUSE_S = float(os.environ.get("AB_PAUSE_MS", "5")) / 1000


def time_ms(f, reps=8):
    if BURST:   # the bench's own timer, after a pause with the card idle
        cupy.cuda.Device().synchronize()
        time.sleep(PAUSE_S)
        return bench_timer.time_calls([f], "cupy", reps=BURST, min_reps=BURST, warmup=0, budget_s=1e9)["ms"]
    s, e = cupy.cuda.Event(), cupy.cuda.Event()
    s.record()
    for _ in range(reps):
        f()
    e.record(); e.synchronize()
    return cupy.cuda.get_elapsed_time(s, e) / reps


def fn_for(src, grid, p, cfg, swizzle=None):
    """A call of the forward with kernel source `src` (the source is a module global, so each call
    sets it and drops the cached spec; the host cost is hidden behind the kernels in flight)."""
    def f():
        _flash_sm90.SOURCE = src
        _flash_sm90.SWIZZLE_WIDTH = swizzle
        _flash_sm90.spec_for.cache_clear()
        return _flash_sm90.forward(p, grid=grid, config=cfg)
    f()                                                  # compile + load now
    return f


def main():
    extra = [_extra(a) for a in sys.argv[1:]]
    rows = parse_rows(os.environ.get("AB_ROWS") or DEFAULT_ROWS)  # e.g. AB_ROWS="128:4096:176x2,64:4096:128x4|128x4x3"
    rng = cupy.random.default_rng(1)
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:
        torch = None

    names = list(dict.fromkeys(v[0] for _, _, cfgs, _ in rows for v in row_variants(cfgs, extra))) + (["cudnn"] if torch else [])
    results = {}
    for D, (LQ, LK), cfgs, H in rows:
        B = 16384 // LK
        q = rng.standard_normal((B, H, LQ, D), dtype=np.float32).astype(bf)
        k, v = (rng.standard_normal((B, H, LK, D), dtype=np.float32).astype(bf) for _ in range(2))
        variants = row_variants(cfgs, extra)
        for causal in ((False, True) if LQ == LK else (False,)):
            p = normalize(q, k, v, causal=causal)
            fns = {name: fn_for(src, grid, p, cfg, w) for name, src, grid, cfg, w in variants}
            ref = fns[variants[0][0]]()[0].astype(np.float32)
            for name, f in list(fns.items()):
                diff = cupy.abs(f()[0].astype(np.float32) - ref)
                err = float(diff.max())
                if not (err < 0.02 or name in UNCHECKED):   # reported and left out: one bad variant costs no call
                    print(f"MISMATCH {D} {LQ}/{LK} causal={causal} {name}: max |diff| {err:.3g} to {variants[0][0]}"
                          f" in {int((diff > 0.02).any(-1).sum())} rows", flush=True)
                    del fns[name]
            if torch:
                tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))
                def cud(tq=tq, tk=tk, tv=tv, causal=causal):
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                fns["cudnn"] = cud
            for f in fns.values():
                f(); f()
            times = {n: [] for n in fns}
            for _ in range(ROUNDS):
                for n, f in fns.items():
                    times[n].append(time_ms(f))
            flops = 4 * B * H * LQ * LK * D / (2 if causal else 1)
            length = f"L{LQ}" if LQ == LK else f"L{LQ}/{LK}"
            heads = "" if H == 2048 // D else f" H{H}"
            row = f"D{D} {length}{heads} {'|'.join(map(cfg_label, cfgs))} " + ("causal" if causal else "full")
            results[row] = {n: flops / np.median(t) / 1e9 for n, t in times.items()}
            print(row + " " + "  ".join(f"{n}={results[row][n]:.0f}" for n in fns), flush=True)

    print("\nmedian TFLOP/s over", ROUNDS, "interleaved rounds" + (f" of {BURST}-launch bursts" if BURST else "")
          + "; (ratio to cudnn)")
    width = max([26] + [len(row) + 1 for row in results])
    col = max([16] + [len(n) + 2 for n in names])
    print(f"{'row':{width}s}" + "".join(n.rjust(col) for n in names))
    for row, r in results.items():
        c = r.get("cudnn")
        print(f"{row:{width}s}" +
              "".join(("-" if n not in r else f"{r[n]:.0f}" + (f" ({r[n] / c:.2f})" if c else "")).rjust(col) for n in names))


if __name__ == "__main__":
    main()
