"""Per-tile timeline of the Hopper forward kernel from clock64 stamps (run on an sm_90 device).

    PYTHONPATH=. python3 tools/trace_sm90.py                # the default rows
    TRACE_ROWS="128:4096:128x2,256:4096:64x2" PYTHONPATH=. python3 tools/trace_sm90.py

It writes kernels_cu/ab_trace.cu (git-ignored): kernels_cu/flash_fwd_sm90.cu with a global stamp
array and a clock64 stamp at a few points of every tile, by consumer warpgroup (thread 0 of it),
and of the Q loader and the K/V producer. It runs each row with that source, reads the stamps back
through RawModule.get_global and prints medians in SM cycles per tile (the first and last tile of
every block left out): the tile period, the steps between the key loop's end and the next tile's
first product, and how long both consumer warpgroups are out of the key loop at once. The stamps
cost the kernel a few percent (~6% at D=128 L=4k on an H200), so read the split, not the speed.
Only full (non-causal) rows are split; the anchors below follow the kernel source, and a source
they no longer match stops the tool with the anchor it missed. Where the kernel defers a tile's end
(Plan::kDeferEnd: two consumers where an O staging buffer fits, e.g. D=128 at 128x2), the last PV
product and the epilogue run in the next tile's first turn and events 5 and 6 are not stamped:
trace the rows of configurations that do not defer (176x2, D=256, three consumers) for those. The split in bench/NOTES.md
(2026-11-28, H200) came from the first, inline form of this script with the same stamps; this
standalone form was checked here without a GPU (the traced source compiles for sm_90a), not yet
run on one.
"""
import os
import sys

import numpy as np
import cupy

sys.path.insert(0, ".")
import cupyattn  # noqa: E402
from cupyattn import _flash_sm90, _kernels  # noqa: E402
from cupyattn._problem import normalize  # noqa: E402
from ab_sm90 import parse_rows, time_ms  # noqa: E402  (tools/ is the script's own directory)

BLOCKS, ROLES, TILES, EVENTS = 132, 8, 64, 8   # stamp array shape: block, role, tile, event
# consumer events: 0 tile popped, 1 Q arrived, 2 first turn taken, 3 first S product done,
# 4 key loop left, 5 last PV product done, 6 epilogue done; role C: Q load issued (event = part);
# role C + 1: the tile's first K load issued (event 0)
STAMPS = [
    ("namespace sm90 {\n",
     "__device__ long long g_trace[%d];\n" % (BLOCKS * ROLES * TILES * EVENTS)
     + "#define TRACE(role, k, e) do { if ((k) < %d) g_trace[((static_cast<long long>(blockIdx.x) * %d + (role)) * %d"
       " + (k)) * %d + (e)] = clock64(); } while (0)\n" % (TILES, ROLES, TILES, EVENTS)),
    ("            const int tile = queue.pop(queued, true);\n",
     "            const int tk = static_cast<int>(queued) - 1;\n            if (tw == 0) TRACE(w, tk, 0);\n"),
    ("            mbar_wait(bar_q(w), (queued - 1u) & 1u);   // this tile's Q (the queue's entry queued - 1)\n",
     "            if (tw == 0) TRACE(w, tk, 1);\n"),
    ("                    if (kDefer) wgmma_wait<1>(); else wgmma_wait<0>();\n",
     "                    if (tw == 0) TRACE(w, tk, 3);\n"),
    ("                    named_bar_sync(my_bar, 256);\n                    if (kDefer) fence_regs(o);\n",
     "                    if (tw == 0) TRACE(w, tk, 2);\n"),
    ("                    prev = pos;\n                    pos.advance<STAGES>();\n                }\n",
     "                if (tw == 0) TRACE(w, tk, 4);\n"),
    ("                    wgmma_wait<0>();\n                    fence_regs(o);\n"
     "                    mbar_arrive(bar_empty_v(prev.stage));\n",
     "                    if (tw == 0) TRACE(w, tk, 5);\n"),
    ("                                                &tm_o, 3 + C + w, bar_q_empty(w));\n",
     "                if (tw == 0) TRACE(w, tk, 6);\n"),
    ("                    mbar_wait(bar_q_empty(w), parity ^ 1u);\n",
     "                    TRACE(C, static_cast<int>(queued) - 1, w);\n"),
    ("                    mbar_wait(bar_empty_k(s), pos.phase ^ 1u);\n",
     "                    if (it == 0) TRACE(C + 1, static_cast<int>(queued) - 1, 0);\n"),
]
TRACE_SOURCE = "ab_trace.cu"


def write_traced_source():
    src = _kernels.read_source(_flash_sm90.SOURCE)
    for anchor, stamp in STAMPS:
        if src.count(anchor) != 1:
            raise SystemExit(f"anchor found {src.count(anchor)} times (want 1), update STAMPS:\n{anchor}")
        src = src.replace(anchor, anchor + stamp)
    (_kernels.kernel_dir() / TRACE_SOURCE).write_text(src)


def launch_ms(source, p, cfg):
    """Milliseconds of one forward with kernel source `source` (left set as the module's SOURCE)."""
    _flash_sm90.SOURCE = source
    _flash_sm90.spec_for.cache_clear()
    for _ in range(3):
        _flash_sm90.forward(p, config=cfg)
    return time_ms(lambda: _flash_sm90.forward(p, config=cfg), reps=10)


def main():
    write_traced_source()
    modules = []
    plain = _kernels._module.__wrapped__

    def capture(source, names, options):      # keep the traced modules, to read their stamps
        m = plain(source, names, options)
        modules.append((source, names, m))
        return m
    _kernels._module = capture
    _kernels._function.cache_clear()
    bf = np.dtype(cupyattn.bfloat16)
    rng = cupy.random.default_rng(3)
    # AB_ROWS' format (tools/ab_sm90.py); the first configuration of each row is traced
    rows = parse_rows(os.environ.get("TRACE_ROWS", "128:4096:176x2,128:16384:176x2,256:4096:64x2"))
    plain_source = _flash_sm90.SOURCE
    for D, (LQ, LK), (cfg, *_), H in rows:
        B = max(1, 16384 // LK)
        q = rng.standard_normal((B, H, LQ, D), dtype=np.float32).astype(bf)
        k, v = (rng.standard_normal((B, H, LK, D), dtype=np.float32).astype(bf) for _ in range(2))
        p = normalize(q, k, v)
        C = _flash_sm90.full_config(cfg)[2]
        plain_ms = launch_ms(plain_source, p, cfg)
        traced_ms = launch_ms(TRACE_SOURCE, p, cfg)
        name = _flash_sm90.spec_for(_flash_sm90.BFLOAT16, D, _flash_sm90.full_config(cfg)).name
        module = [m for s_, n, m in modules if s_ == TRACE_SOURCE and name in n][-1]
        # sm90::g_trace, mangled
        buf = cupy.ndarray((BLOCKS * ROLES * TILES * EVENTS,), np.int64, memptr=module.get_global("_ZN4sm907g_traceE"))
        buf.fill(0)
        _flash_sm90.forward(p, config=cfg)     # one launch on a clean stamp array (SOURCE is the traced one)
        cupy.cuda.Device().synchronize()
        t = cupy.asnumpy(buf).reshape(BLOCKS, ROLES, TILES, EVENTS).astype(np.float64)
        n_key = -(-LK // cfg[0])
        steps = {k: [] for k in ("period", "last PV", "epilogue", "pop", "Q wait", "turn wait", "first S",
                                 "Q load -> arrival", "both out of the loop")}
        # a deferred tile end stamps no events 5 and 6: the period and the pop count from event 4
        end = 4 if _flash_sm90.defers_tile_end(D, cfg) else 6
        for b in range(BLOCKS):
            n = int((t[b, 0, :, end] > 0).sum())
            for kk in range(1, n - 1):
                for w in range(C):
                    ev = t[b, w]
                    steps["period"].append(ev[kk + 1, end] - ev[kk, end])
                    if end == 6:
                        steps["last PV"].append(ev[kk, 5] - ev[kk, 4])
                        steps["epilogue"].append(ev[kk, 6] - ev[kk, 5])
                    steps["pop"].append(ev[kk + 1, 0] - ev[kk, end])
                    steps["Q wait"].append(ev[kk + 1, 1] - ev[kk + 1, 0])
                    steps["turn wait"].append(ev[kk + 1, 2] - ev[kk + 1, 1])
                    steps["first S"].append(ev[kk + 1, 3] - ev[kk + 1, 2])
                    steps["Q load -> arrival"].append(ev[kk + 1, 1] - t[b, C, kk + 1, w])
                outs = [(t[b, w, kk, 4], t[b, w, kk + 1, 2]) for w in range(C)]
                steps["both out of the loop"].append(max(0.0, min(o[1] for o in outs) - max(o[0] for o in outs)))
        med = {k: float(np.median(v)) for k, v in steps.items() if v}
        flops = 4 * B * H * LQ * LK * D
        print(f"D={D} L={LQ}/{LK} {cfg}: plain {flops / plain_ms / 1e9:.0f} TFLOP/s, "
              f"traced {flops / traced_ms / 1e9:.0f}; {n_key} key tiles a tile")
        print("   " + "  ".join(f"{k} {v:,.0f}" for k, v in med.items()))
        print(f"   per key tile {med['period'] / n_key:,.0f} cycles (SM clock)", flush=True)


if __name__ == "__main__":
    main()
