#!/usr/bin/env python
"""Speed, memory and accuracy of every cupyattn backend beside PyTorch SDPA's backends.

    python bench/attention.py --quick            # about a minute on an H100; ~20 s on a CPU
    python bench/attention.py                    # the headline grid (issues 3, 4, 6)
    python bench/attention.py --full             # + float32, GQA and the memory sweep
    python bench/attention.py --quick --dry-run  # list the rows without running them

Each case first checks every backend (result, first-call time, peak memory), then times them
in --rounds interleaved rounds (3 on a GPU): each round times every backend once, in turn (the
order rotating by round, each turn after an idle --pause), with its share of --budget, and a
row's ms is the median of its rounds' medians. A GPU's clocks drift during a run; timed in turn,
all backends of a case see the same drift and their ratios hold (timed one after the other, the
ratio to torch's cuDNN moved by up to ±5% between runs on an H200).

On a machine without a usable CUDA GPU it runs the NumPy path on small sizes, labelled
"CPU (NumPy)". See bench/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path


def _set_cpu_threads(argv):
    """BLAS threads for the NumPy path, fixed before NumPy loads: --threads N, else the environment's
    setting, else 1 (multithreaded BLAS on a shared, busy CPU spins and runs ~5x slower)."""
    n = None
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if n is not None:
            os.environ[var] = n
        else:
            os.environ.setdefault(var, "1")


if __name__ == "__main__":
    _set_cpu_threads(sys.argv[1:])

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

OURS_LABEL = "cupyattn"
TORCH_BACKENDS = {            # our label -> torch.nn.attention.SDPBackend member
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-math": "MATH",
}
# Our backends with a kernel switched off, timed as rows of their own only when named in --backend:
# label -> (our backend, module switches set to False for its calls). flash-sm80 runs the mma.sync
# kernels on a Hopper card too, so that the Hopper kernels' gain over them is measured in one run.
OUR_VARIANTS = {
    "flash-sm80": ("flash", (("_flash", "HOPPER_KERNEL"), ("_flash_bwd_sm90", "HOPPER_BACKWARD"))),
}
SHORT = {"torch-flash": "t.flash", "torch-efficient": "t.eff", "torch-cudnn": "t.cudnn", "torch-math": "t.math"}
FLAG_REL_ERR = 0.05           # a relative error above this is certainly a bug: flagged in the note


# ----------------------------------------------------------------------------------------------
# Cases

@dataclass(frozen=True)
class Case:
    group: str        # headline | decode | memory | dtypes | gqa
    op: str           # fwd | fwdbwd
    dtype: str        # bfloat16 | float16 | float32 | float64
    batch: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool

    @property
    def fwd_flops(self) -> float:
        f = 4.0 * self.batch * self.hq * self.lq * self.lk * self.d
        return f / 2 if self.causal else f

    @property
    def flops(self) -> float:
        """Forward 4·B·Hq·Lq·Lk·D (halved for causal); forward+backward counted as 3.5× that."""
        return self.fwd_flops * (3.5 if self.op == "fwdbwd" else 1.0)

    @property
    def itemsize(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[self.dtype]

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V one forward must read at least once."""
        return 2 * self.batch * self.hkv * self.lk * self.d * self.itemsize

    @property
    def input_bytes(self) -> int:
        n = self.batch * (self.hq * self.lq * self.d * (2 if self.op == "fwdbwd" else 1)
                          + 2 * self.hkv * self.lk * self.d)
        return n * self.itemsize

    def label(self) -> str:
        heads = f"H{self.hq}" if self.hq == self.hkv else f"H{self.hq}/{self.hkv}"
        lens = f"L{self.lk}" if self.lq == self.lk else f"Lq{self.lq}/Lk{self.lk}"
        return (f"{self.group} {self.op} {self.dtype} D{self.d} {lens} B{self.batch} {heads}"
                f"{' causal' if self.causal else ''}")


def headline(L, D, causal, op, dtype="bfloat16", group="headline", tokens=16384, width=2048):
    """B·L = tokens, H·D = width (the issues' grid)."""
    return Case(group, op, dtype, max(1, tokens // L), width // D, width // D, L, L, D, causal)


def gpu_cases(preset):
    ops = ("fwd", "fwdbwd")
    cases = []
    if preset == "quick":
        grid = [(L, 128) for L in (1024, 4096)]
    else:
        grid = [(L, D) for D in (64, 128, 256) for L in (1024, 4096, 16384)]
    for L, D in grid:
        for causal in (False, True):
            for op in ops:
                cases.append(headline(L, D, causal, op))
    if preset == "full":
        for L, D in grid:                    # the headline grid in float16 (the Hopper issue's rows)
            for causal in (False, True):
                for op in ops:
                    cases.append(headline(L, D, causal, op, dtype="float16", group="dtypes"))
        for L in (1024, 4096, 16384):
            for causal in (False, True):
                for op in ops:
                    cases.append(headline(L, 128, causal, op, dtype="float32", group="dtypes"))
        for hkv in (4, 1):                       # GQA 4:1 and MQA, H=16, D=128, L=4k
            for causal in (False, True):
                for op in ops:
                    cases.append(Case("gqa", op, "bfloat16", 4, 16, hkv, 4096, 4096, 128, causal))
    # decode: one query against a 32k-key cache (non-causal: with Lq=1 bottom-right causal sees all)
    cases.append(Case("decode", "fwd", "bfloat16", 8, 32, 8, 1, 32768, 128, False))
    mem_ls = (1024, 2048, 4096, 8192, 16384, 32768, 65536) if preset == "full" else (8192,)
    for L in mem_ls:
        cases.append(Case("memory", "fwd", "bfloat16", 1, 16, 16, L, L, 128, False))
    return cases


def cpu_cases(preset):
    """Small sizes for the NumPy path (must finish in well under 40 s on two cores)."""
    ops = ("fwd", "fwdbwd")
    cases = []
    ls, ds = ((256, 1024), (64,)) if preset == "quick" else ((256, 1024, 2048), (64, 128))
    for D in ds:
        for L in ls:
            for causal in (False, True):
                for op in ops:
                    cases.append(Case("headline", op, "float32", 1, 4, 4, L, L, D, causal))
    if preset == "full":
        for dtype in ("bfloat16", "float64"):
            for op in ops:
                cases.append(Case("dtypes", op, dtype, 1, 4, 4, 1024, 1024, 64, True))
        for op in ops:
            cases.append(Case("gqa", op, "float32", 1, 8, 2, 1024, 1024, 64, True))
    cases.append(Case("decode", "fwd", "float32", 1, 8, 2, 1, 16384, 64, False))
    for L in ((512, 1024, 2048, 4096) if preset == "full" else (2048,)):
        cases.append(Case("memory", "fwd", "float32", 1, 2, 2, L, L, 64, False))
    return cases


def _ints(text):
    return {int(x) for x in text.split(",") if x.strip()} if text else None


def _names(text):
    return {x.strip() for x in text.split(",") if x.strip()} if text else None


def filter_cases(cases, args):
    ds, ls, dtypes = _ints(args.d), _ints(args.l), _names(args.dtype)
    ops, groups = _names(args.op), _names(args.group)
    keep = []
    for c in cases:
        if ds and c.d not in ds:
            continue
        if ls and c.lk not in ls:
            continue
        if dtypes and c.dtype not in dtypes:
            continue
        if ops and c.op not in ops:
            continue
        if groups and c.group not in groups:
            continue
        if args.causal == "yes" and not c.causal or args.causal == "no" and c.causal:
            continue
        keep.append(c)
    return keep


def select_impls(ours, torch_names, wanted):
    """Backends to run: our registered ones, then torch's; `wanted` may name them or say ours/torch.
    OUR_VARIANTS of a backend we have run only where `wanted` names them."""
    impls = list(ours) + list(torch_names)
    if not wanted:
        return impls
    variants = [v for v, (base, _) in OUR_VARIANTS.items() if base in ours]
    out = []
    for name in list(ours) + variants + list(torch_names):
        if name in wanted or (name in ours and "ours" in wanted) or (name in torch_names and "torch" in wanted):
            out.append(name)
    unknown = wanted - set(impls) - set(variants) - {"ours", "torch"}
    if unknown:
        print(f"note: unknown or unavailable backend(s) ignored: {', '.join(sorted(unknown))} "
              f"(known: {', '.join(impls)})", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------
# Inputs

class Inputs:
    def __init__(self, q, k, v, dout):
        self.q, self.k, self.v, self.dout = q, k, v, dout
        self._torch = {}

    def torch_views(self, torch, grad: bool):
        """The same memory as torch tensors (DLPack); requires_grad leaves when `grad`."""
        key = bool(grad)
        if key not in self._torch:
            conv = [_to_torch(a, torch) if a is not None else None for a in (self.q, self.k, self.v, self.dout)]
            if grad:
                conv[:3] = [t.detach().requires_grad_(True) for t in conv[:3]]
            self._torch[key] = conv
        return self._torch[key]


def _to_torch(a, torch):
    try:
        return torch.from_dlpack(a)
    except Exception:  # noqa: BLE001 - older stacks cannot pass bfloat16 through DLPack
        import cupyattn
        if np.dtype(a.dtype) != np.dtype(cupyattn.bfloat16):
            raise
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)


def np_dtype(name):
    import cupyattn
    return np.dtype(cupyattn.bfloat16) if name == "bfloat16" else np.dtype(name)


def make_inputs(case, xp, seed, n_sets):
    """Fresh standard-normal q, k, v (and dout for fwdbwd), `n_sets` independent sets."""
    dt = np_dtype(case.dtype)
    gen_dt = np.float64 if case.dtype == "float64" else np.float32
    shapes = [(case.batch, case.hq, case.lq, case.d), (case.batch, case.hkv, case.lk, case.d),
              (case.batch, case.hkv, case.lk, case.d)]
    if case.op == "fwdbwd":
        shapes.append((case.batch, case.hq, case.lq, case.d))
    sets = []
    for s in range(n_sets):
        rng = xp.random.default_rng(seed * 1000 + s)
        arrays = [_cast(xp, rng.standard_normal(sh, dtype=gen_dt), dt) for sh in shapes]
        if len(arrays) == 3:
            arrays.append(None)
        sets.append(Inputs(*arrays))
    return sets


def _cast(xp, x, dt):
    """x.astype(dt); for bfloat16 on a CuPy that cannot cast to it on the device, keep the upper
    16 bits of each float32 (truncation; fine for random inputs)."""
    try:
        return x.astype(dt)
    except Exception:  # noqa: BLE001
        if xp is np or dt != np_dtype("bfloat16"):
            raise
        return (x.view(xp.uint32) >> 16).astype(xp.uint16).view(dt)


def reference(case, inp):
    """Float64 out (and dq for fwdbwd) on a subsample: the first and the last (batch, head), 16 rows."""
    heads = sorted({(0, 0), (case.batch - 1, case.hq - 1)})
    rows = np.unique(np.linspace(0, case.lq - 1, min(16, case.lq)).astype(int))
    group = case.hq // case.hkv
    scale = 1.0 / np.sqrt(case.d)
    refs = []
    for b, h in heads:
        q = C.to_f64(inp.q[b, h])
        k = C.to_f64(inp.k[b, h // group])
        v = C.to_f64(inp.v[b, h // group])
        dout = C.to_f64(inp.dout[b, h])[rows] if inp.dout is not None else None
        out, dq = C.reference_rows(q, k, v, rows, causal=case.causal, scale=scale, dout=dout)
        refs.append((b, h, out, dq))
    return rows, refs


# ----------------------------------------------------------------------------------------------
# Calls for each implementation: one zero-argument callable per input set, returning a dict

@contextlib.contextmanager
def _switched(cupyattn, label):
    """Our backend for `label` (its OUR_VARIANTS switches off while inside)."""
    base, switches = OUR_VARIANTS.get(label, (label, ()))
    modules = [(importlib.import_module(f"{cupyattn.__name__}.{m}"), attr) for m, attr in switches]
    saved = [getattr(m, attr) for m, attr in modules]
    for m, attr in modules:
        setattr(m, attr, False)
    try:
        yield base
    finally:
        for (m, attr), value in zip(modules, saved):
            setattr(m, attr, value)


def ours_reasons(cupyattn, case, label, inp):
    """Why our backend `label` cannot run this case (empty list: it can)."""
    why = []
    directions = ("forward", "backward") if case.op == "fwdbwd" else ("forward",)
    with _switched(cupyattn, label) as name:
        for direction in directions:
            ex = cupyattn.explain(inp.q, inp.k, inp.v, causal=case.causal, backend=name, direction=direction)
            if ex.backend is None:
                text = "; ".join(ex.why_not.get(name) or ["cannot run"])
                why.append(text if len(directions) == 1 else f"{direction}: {text}")
    return why


def ours_calls(cupyattn, case, label, sets):
    causal = case.causal
    name = OUR_VARIANTS.get(label, (label,))[0]

    def make(inp):
        if case.op == "fwd":
            return lambda: {"out": cupyattn.attention(inp.q, inp.k, inp.v, causal=causal, backend=name)}

        def fwdbwd():
            out, lse = cupyattn.attention(inp.q, inp.k, inp.v, causal=causal, backend=name, return_lse=True)
            dq, dk, dv = cupyattn.attention_backward(inp.dout, inp.q, inp.k, inp.v, out, lse, causal=causal,
                                                     backend=name)
            return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
        return fwdbwd

    def switched(call):
        def run():
            with _switched(cupyattn, label):
                return call()
        return run
    calls = [make(inp) for inp in sets]
    # only a variant pays for the switches: a few microseconds a call, which host-bound rows show
    return [switched(c) for c in calls] if label in OUR_VARIANTS else calls


def torch_calls(torch, case, sets):
    """torch's causal is top-left aligned, ours bottom-right: identical here since causal cases have Lq == Lk."""
    import torch.nn.functional as F
    grad = case.op == "fwdbwd"
    kw = {"is_causal": case.causal}
    if case.hq != case.hkv:
        kw["enable_gqa"] = True

    def make(inp):
        q, k, v, dout = inp.torch_views(torch, grad)
        if not grad:
            def fwd():
                with torch.no_grad():
                    return {"out": F.scaled_dot_product_attention(q, k, v, **kw)}
            return fwd

        def fwdbwd():
            out = F.scaled_dot_product_attention(q, k, v, **kw)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
        return fwdbwd
    return [make(inp) for inp in sets]


def _nbytes(a):
    if hasattr(a, "element_size"):
        return a.numel() * a.element_size()
    return int(a.nbytes)


def _all_finite(a) -> bool:
    if hasattr(a, "detach"):
        import torch
        return bool(torch.isfinite(a.detach()).all().item())
    xp = sys.modules.get("cupy") if hasattr(a, "get") else np
    if np.dtype(a.dtype) == np_dtype("bfloat16"):
        # exponent bits all ones = inf or NaN (no need for bfloat16 ufuncs)
        bits = xp.ascontiguousarray(a).view(xp.uint16)
        return bool(((bits & 0x7F80) != 0x7F80).all())
    return bool(xp.isfinite(a).all())


# ----------------------------------------------------------------------------------------------
# Running

class Runner:
    def __init__(self, args, xp, cupy, torch, cupyattn):
        self.args, self.xp, self.cupy, self.torch, self.cupyattn = args, xp, cupy, torch, cupyattn
        self.lib = "cupy" if cupy is not None else "cpu"

    def n_sets(self, case):
        """Two input sets rotated (so L2 never holds the next call's inputs) when memory allows."""
        if self.cupy is not None:
            free, _ = self.cupy.cuda.runtime.memGetInfo()
            return 2 if 2 * case.input_bytes < 0.3 * free else 1
        return 2 if case.input_bytes < 256 * 2**20 else 1

    def run_case(self, case, impls, progress):
        base = asdict(case)
        base.update(flops=case.flops, kv_bytes=case.kv_bytes, input_bytes=case.input_bytes)
        rows = []
        sets = None
        try:
            sets = make_inputs(case, self.xp, self.args.seed, self.n_sets(case))
            ref = reference(case, sets[0])
        except Exception as e:  # noqa: BLE001 - inputs that do not fit: every row says so
            status = "OOM" if C.is_oom(e) else "error"
            note = "inputs do not fit" if status == "OOM" else f"inputs: {C.first_line(e)}"
            for name in impls:
                rows.append(dict(base, backend=name, impl=self._impl_of(name), status=status, note=note))
                progress.update(f"{case.label()} {name}")
            sets = None
            C.free_memory(self.cupy, self.torch)
            return rows
        # Phase 1, backend after backend: check the result, first-call time, peak memory. What
        # passes keeps its calls for the timed rounds.
        ready = []
        for name in impls:
            row = dict(base, backend=name, impl=self._impl_of(name), n_sets=len(sets), status="ok", note="")
            try:
                timer = self._measure(case, name, sets, ref, row)
            except Exception as e:  # noqa: BLE001 - a failing backend must not end the sweep
                timer = None
                self._mark_failed(row, e)
            rows.append(row)
            C.free_memory(self.cupy, self.torch, collect=row["status"] != "ok")
            if timer is None:
                progress.update(f"{case.label()} {name}")
            else:
                ready.append(timer)
        # Phase 2: the rounds. Each round times every backend once, in turn, so a drift of the GPU's
        # clocks over the case shifts all backends alike and their ratios hold. A card at its power
        # cap lowers its clocks after a heavy burst and takes a while to raise them again, so each
        # backend's turn starts after an idle --pause, and the turns rotate by round: no backend
        # always follows the same one (H200, D=128 L=16k full, no pause, fixed order: our rounds
        # 3.06 ms in the first, 3.37-3.47 ms in the rest, each right after cuDNN's).
        n_rounds = self.args.rounds
        for i in range(n_rounds):
            for timer in ready[i % len(ready):] + ready[:i % len(ready)]:
                row = timer.row
                if row["status"] != "ok":
                    continue
                if self.args.pause > 0:
                    time.sleep(self.args.pause)
                try:
                    timer.time_round(self.args.budget / n_rounds)
                except Exception as e:  # noqa: BLE001 - a failing round must not end the sweep
                    self._mark_failed(row, e)
                    progress.update(f"{case.label()} {row['backend']}")
                # one backend's cached blocks must not crowd the next one out of memory
                C.free_memory(self.cupy, self.torch, collect=row["status"] != "ok")
                if i == n_rounds - 1 and row["status"] == "ok":
                    timer.finish()
                    progress.update(f"{case.label()} {row['backend']}")
        del ready, sets
        C.free_memory(self.cupy, self.torch)
        _add_ratios(rows)
        return rows

    def _mark_failed(self, row, e):
        if C.is_oom(e):
            row.update(status="OOM", note="out of memory")
        elif isinstance(e, getattr(self.cupyattn, "BackendUnavailable", ())):
            row.update(status="unavailable", note=C.first_line(e, 300))
        else:
            row.update(status="error", note=f"{type(e).__name__}: {C.first_line(e)}")

    def _impl_of(self, name):
        return "torch" if name in TORCH_BACKENDS else OURS_LABEL

    def _measure(self, case, name, sets, ref, row):
        """Phase 1 of one backend: a Timer for its rounds, or None (the row says why it cannot run)."""
        if name in TORCH_BACKENDS:
            return self._measure_torch(case, name, sets, ref, row)
        why = ours_reasons(self.cupyattn, case, name, sets[0])
        if why:
            row.update(status="unavailable", note="; ".join(why))
            return None
        return self._measure_calls(case, ours_calls(self.cupyattn, case, name, sets), self.lib, ref, row)

    def _measure_torch(self, case, name, sets, ref, row):
        from torch.nn.attention import SDPBackend
        member = getattr(SDPBackend, TORCH_BACKENDS[name], None)
        if member is None:
            row.update(status="unavailable", note=f"this torch has no SDPBackend.{TORCH_BACKENDS[name]}")
            return None
        calls = torch_calls(self.torch, case, sets)
        with _forced_sdpa(member) as caught:
            try:
                timer = self._measure_calls(case, calls, "torch", ref, row)
            except RuntimeError as e:
                if C.is_oom(e):
                    raise
                reasons = _torch_reasons(caught)
                msg = str(e).lower()
                if "no available kernel" in msg or "no viable backend" in msg or reasons:
                    row.update(status="unavailable", note="; ".join(reasons) or C.first_line(e))
                    return None
                raise
            except TypeError as e:      # enable_gqa on a torch older than 2.5
                if "enable_gqa" not in str(e):
                    raise
                row.update(status="unavailable", note=f"this torch has no enable_gqa: {C.first_line(e)}")
                return None
        # the timed calls must run under the same forced backend as the checked ones
        timer.context = lambda: _forced_sdpa(member)
        return timer

    def _measure_calls(self, case, calls, lib, ref, row):
        fwdbwd = case.op == "fwdbwd"
        # 1. first call (compiles, autotunes): check the result
        t0 = time.perf_counter()
        res = calls[0]()
        C._sync(lib)
        row["first_call_ms"] = 1000 * (time.perf_counter() - t0)
        notes = []
        finite = all(_all_finite(res[key]) for key in (("out", "dq", "dk", "dv") if fwdbwd else ("out",)))
        row["finite"] = finite
        if not finite:
            notes.append("NON-FINITE output")
        rows_idx, refs = ref
        key = "dq" if fwdbwd else "out"
        worst = {"max_abs_err": 0.0, "rel_err": 0.0}
        for b, h, ref_out, ref_dq in refs:
            got = C.to_f64(res[key][b, h])[rows_idx]
            stats = C.error_stats(got, ref_dq if fwdbwd else ref_out)
            worst = {k: max(worst[k], stats[k]) for k in worst}
        row.update(worst, err_of=key)
        if worst["rel_err"] > FLAG_REL_ERR:
            notes.append(f"CHECK: rel err {worst['rel_err']:.2g}")
        del res
        # 2. second call under the memory counter
        t0 = time.perf_counter()
        res, peak = C.measure_peak(calls[0], lib)
        second_ms = 1000 * (time.perf_counter() - t0)
        out_bytes = sum(_nbytes(a) for a in res.values())
        del res
        row.update(peak_extra_bytes=peak, out_bytes=out_bytes, workspace_bytes=max(0, peak - out_bytes))
        if notes:
            row["note"] = "; ".join(notes)
        # 3. timing: later, in the case's rounds
        return Timer(case, row, calls, lib, reps=self.args.reps or (10 if fwdbwd else 20),
                     rounds=self.args.rounds, warmup=self.args.warmup, est_ms=second_ms)


class Timer:
    """The timed rounds of one backend in one case; its row gets the figures of all rounds together."""

    def __init__(self, case, row, calls, lib, *, reps, rounds, warmup, est_ms):
        self.case, self.row, self.calls, self.lib, self.warmup = case, row, calls, lib, warmup
        # the repeats of a row are shared out over its rounds, so R rounds cost about what one did;
        # its minimum of 3 too, so a slow call still gets at least 3 timed repeats in all
        self.min_reps = math.ceil(3 / rounds)
        self.reps = max(self.min_reps, math.ceil(reps / rounds))
        self.est_ms = est_ms      # the latest time of one call: sizes the next round's repeats
        self.context = contextlib.nullcontext
        self.results = []

    def time_round(self, budget_s):
        with self.context():
            t = C.time_calls(self.calls, self.lib, reps=self.reps, min_reps=self.min_reps, warmup=self.warmup,
                             budget_s=budget_s, first_ms=self.est_ms)
        self.results.append(t)
        self.est_ms = t["ms"]

    def finish(self):
        """ms: the median of the rounds' medians (a round disturbed by a clock change moves it least)."""
        res = self.results
        reps = sum(t["reps"] for t in res)
        ms = float(np.median([t["ms"] for t in res]))
        self.row.update(ms=ms, mean_ms=sum(t["mean_ms"] * t["reps"] for t in res) / reps,
                        min_ms=min(t["min_ms"] for t in res), reps=reps, rounds=len(res),
                        round_ms=[t["ms"] for t in res])
        self.row["tflops"] = self.case.flops / (ms * 1e-3) / 1e12
        self.row["kv_gbps"] = self.case.kv_bytes / (ms * 1e-3) / 1e9
        self.calls = None


@contextlib.contextmanager
def _forced_sdpa(member):
    """torch's SDPA forced to one backend; its warnings are recorded (they say why it cannot run)."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([member]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _torch_reasons(caught):
    """The reasons torch gave (as warnings) for not running a forced SDPA backend."""
    out = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if not text or "kernel not used because" in text or "Aborting" in text:
            continue
        if text not in out:
            out.append(text)
    return out


def _add_ratios(rows):
    """For each of our rows: torch ms / our ms for each torch backend (>1: ours is faster)."""
    torch_ms = {r["backend"]: r["ms"] for r in rows if r["impl"] == "torch" and r.get("ms")}
    for r in rows:
        if r["impl"] == OURS_LABEL and r.get("ms"):
            r["vs_torch"] = {name: ms / r["ms"] for name, ms in torch_ms.items()}


# ----------------------------------------------------------------------------------------------
# Output

def _mib(x):
    return None if x is None else x / 2**20


def row_cells(r, torch_cols, gbps):
    heads = f"{r['hq']}" if r["hq"] == r["hkv"] else f"{r['hq']}/{r['hkv']}"
    L = f"{r['lk']}" if r["lq"] == r["lk"] else f"{r['lq']}/{r['lk']}"
    ok = r["status"] == "ok"
    note = r.get("note") or ("" if ok else r["status"])
    if r["status"] == "OOM":
        note = "OOM"
    cells = [r["group"], r["op"], r["dtype"], r["d"], L, r["batch"], heads, "yes" if r["causal"] else "no",
             r["backend"],
             C.fmt_num(r.get("ms")) if ok else "-",
             C.fmt_num(r.get("tflops")) if ok else "-"]
    if gbps:
        cells.append(C.fmt_num(r.get("kv_gbps")) if ok and r["group"] == "decode" else "")
    cells += [C.fmt_num(_mib(r.get("peak_extra_bytes"))) if ok else "-",
              C.fmt_num(_mib(r.get("workspace_bytes"))) if ok else "-",
              C.fmt_num(r.get("max_abs_err"), 2) if ok else "-",
              C.fmt_num(r.get("rel_err"), 2) if ok else "-"]
    for t in torch_cols:
        x = (r.get("vs_torch") or {}).get(t)
        cells.append(f"{x:.2f}" if x is not None else "")
    if r.get("commit"):            # a merged table: which run the row comes from
        note = f"@{r['commit']}" + (f"; {note}" if note else "")
    if len(note) > 90:
        note = note[:87] + "..."
    cells.append(note)
    return cells


def print_tables(rows, meta, file=sys.stdout):
    torch_cols = [t for t in TORCH_BACKENDS if any(r["backend"] == t for r in rows)]
    gbps = any(r["group"] == "decode" for r in rows)
    headers = ["group", "op", "dtype", "D", "L", "B", "H", "causal", "backend", "ms", "TFLOP/s"]
    if gbps:
        headers.append("GB/s")
    headers += ["peak MiB", "ws MiB", "max err", "rel err"] + [f"x{SHORT[t]}" for t in torch_cols] + ["note"]
    right = {3, 4, 5, 6} | set(range(9, len(headers) - 1))
    title = f"cupyattn bench on {meta.get('platform')}"
    if meta.get("gpu"):
        title += f": {meta['gpu']}, driver {meta.get('driver_version') or meta.get('driver')}, " \
                 f"CUDA {meta.get('cuda_runtime')}, CuPy {meta.get('cupy')}, torch {meta.get('torch')}"
    else:
        title += f" ({meta.get('cpu')}, {meta.get('cpu_count')} cores); NumPy {meta.get('numpy')}"
    print(title, file=file)
    if meta.get("merged_from"):   # rows from several runs: each row's run is in merged_from / the JSON
        print(f"merged from runs at commits {', '.join(map(str, meta.get('commits', [])))}: "
              f"{', '.join(meta['merged_from'])}", file=file)
    else:
        print(f"commit {meta.get('commit')}  date {meta.get('date')}  {_timing_text(meta)}".rstrip(), file=file)
    print(file=file)
    print(C.format_table(headers, [row_cells(r, torch_cols, gbps) for r in rows], right), file=file)
    print(file=file)
    print_summary(rows, file)


def _timing_text(meta):
    """How the rows were timed, from a run's meta (older runs lack some of it)."""
    parts = []
    if meta.get("budget_s") is not None:
        parts.append(f"budget {meta['budget_s']:g} s/row")
    if meta.get("rounds") is not None:
        parts.append(f"in {meta['rounds']} interleaved rounds" if meta["rounds"] > 1 else "in 1 round")
    if meta.get("warmup") is not None:
        parts.append(f"warmup {meta['warmup']}")
    if meta.get("pause_s"):
        parts.append(f"pause {meta['pause_s']:g} s before each turn")
    return ", ".join(parts)


def print_summary(rows, file=sys.stdout):
    """One line per case, TFLOP/s by backend (decode: GB/s of K/V; memory group: peak MiB)."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cases = {}
    for r in rows:
        key = (r["group"], r["op"], r["dtype"], r["d"], r["lq"], r["lk"], r["hq"], r["hkv"], r["causal"])
        cases.setdefault(key, {})[r["backend"]] = r
    lines = []
    for (group, op, dtype, d, lq, lk, hq, hkv, causal), by in cases.items():
        unit = "GB/s" if group == "decode" else ("peak MiB" if group == "memory" else "TFLOP/s")
        cells = [group, op, dtype, d, lk if lq == lk else f"{lq}/{lk}",
                 hq if hq == hkv else f"{hq}/{hkv}", "yes" if causal else "no", unit]
        for b in backends:
            r = by.get(b)
            if r is None:
                cells.append("")
            elif r["status"] == "OOM":
                cells.append("OOM")
            elif r["status"] != "ok":
                cells.append("n/a")
            else:
                x = {"GB/s": r.get("kv_gbps"), "peak MiB": _mib(r.get("peak_extra_bytes"))}.get(unit, r.get("tflops"))
                cells.append(C.fmt_num(x))
        lines.append(cells)
    headers = ["group", "op", "dtype", "D", "L", "H", "causal", "unit"] + backends
    print("Summary (n/a: backend cannot run the case, reason in the table above)", file=file)
    print(C.format_table(headers, lines, set(range(3, 6)) | set(range(8, len(headers)))), file=file)


def plot(rows, stem: Path):
    """TFLOP/s vs L per backend (one PNG per dtype and D), and peak memory vs L (log-log)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"plots skipped: matplotlib not importable ({type(e).__name__})", file=sys.stderr)
        return []
    written = []
    sweep = [r for r in rows if r["group"] in ("headline", "dtypes") and r["lq"] == r["lk"]]
    for dtype, d in sorted({(r["dtype"], r["d"]) for r in sweep}):
        sel = [r for r in sweep if r["dtype"] == dtype and r["d"] == d]
        panels = [(op, c) for op in ("fwd", "fwdbwd") for c in (False, True)
                  if any(r["op"] == op and r["causal"] == c for r in sel)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (op, causal) in zip(axes[0], panels):
            for b in dict.fromkeys(r["backend"] for r in sel):
                pts = sorted((r["lk"], r["tflops"]) for r in sel
                             if r["backend"] == b and r["op"] == op and r["causal"] == causal and r.get("tflops"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle="--" if b.startswith("torch") else "-", label=b)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op}, {'causal' if causal else 'non-causal'}")
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        tokens = {r["batch"] * r["lk"] for r in sel}
        heads = {r["hq"] for r in sel}
        fig.suptitle(f"{dtype}, D={d}, H={'/'.join(map(str, sorted(heads)))}, "
                     + (f"B·L={tokens.pop()} tokens" if len(tokens) == 1 else f"B={sel[0]['batch']}"))
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_tflops_{dtype}_D{d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    mem = [r for r in rows if r["group"] == "memory"]
    if mem:
        r0 = mem[0]
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        names = list(dict.fromkeys(r["backend"] for r in mem))
        lengths = sorted({r["lk"] for r in mem})
        if len(lengths) == 1:                   # one length (--quick): a bar per backend
            vals = []
            for b in names:
                r = next(r for r in mem if r["backend"] == b)
                vals.append((b, _mib(r.get("peak_extra_bytes")) if r["status"] == "ok" else None, r["status"]))
            xs = range(len(vals))
            ax.bar(xs, [v or 0 for _, v, _ in vals], color=["tab:gray" if b.startswith("torch") else "tab:blue"
                                                          for b, _, _ in vals])
            for x, (b, v, status) in zip(xs, vals):
                ax.text(x, v or 0, C.fmt_num(v) if v else ("OOM" if status == "OOM" else "n/a"),
                        ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(xs))
            ax.set_xticklabels([b for b, _, _ in vals], rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(f"L={lengths[0]}, B={r0['batch']}, H={r0['hq']}, D={r0['d']}")
            ax.set_ylim(bottom=0)
        else:
            for b in names:
                pts = sorted((r["lk"], _mib(r["peak_extra_bytes"])) for r in mem
                             if r["backend"] == b and r["status"] == "ok" and r.get("peak_extra_bytes"))
                ooms = sorted(r["lk"] for r in mem if r["backend"] == b and r["status"] == "OOM")
                label = b + (f" (OOM from L={ooms[0]})" if ooms else "")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle="--" if b.startswith("torch") else "-", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"sequence length L (B={r0['batch']}, H={r0['hq']}, D={r0['d']})")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_ylabel("peak extra memory of one forward (MiB)")
        ax.set_title(f"peak memory beyond the inputs, {r0['dtype']}")
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def default_out(meta, preset) -> Path:
    day = _dt.date.today().isoformat()
    where = C.slug(meta.get("gpu")) if meta.get("gpu") else "cpu"
    return C.RESULTS_DIR / f"{day}_{where}_{preset}.json"


def finish(rows, meta, out: Path, plots: bool):
    print_tables(rows, meta)
    C.write_json(out, {"meta": meta, "rows": rows})
    print(f"\nwrote {out}", file=sys.stderr)
    if plots:
        for p in plot(rows, out.with_suffix("")):
            print(f"wrote {p}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a subset: D=128, L in {1k,4k}, decode, one memory row")
    preset.add_argument("--full", action="store_true", help="full grid + float32 + GQA + memory sweep 1k..64k")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: CuPy on the current CUDA device; cpu: the NumPy path (default: gpu if usable)")
    p.add_argument("--backend", help="comma list: flash,chunked,eager,torch-flash,torch-efficient,"
                                     "torch-cudnn,torch-math, or 'ours' / 'torch'")
    p.add_argument("--dtype", help="comma list of dtypes to keep (bfloat16,float32,...)")
    p.add_argument("--d", help="comma list of head dims to keep")
    p.add_argument("--l", help="comma list of (key) sequence lengths to keep")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--op", help="fwd, fwdbwd or both (comma list)")
    p.add_argument("--group", help="comma list of row groups: headline,decode,memory,dtypes,gqa")
    p.add_argument("--no-torch", action="store_true", help="do not import torch (no PyTorch rows)")
    p.add_argument("--reps", type=int, default=0, help="timed repeats per row, shared out over the rounds "
                                                       "(default 20 fwd / 10 fwdbwd, fewer when one call is "
                                                       "slow: see --budget)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before each round's timing (besides the first call)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per row at most, shared out over the rounds; min 3 repeats "
                        "(default 0.3 quick, 1.0 otherwise)")
    p.add_argument("--rounds", type=int, default=None, metavar="R",
                   help="time the backends of a case in R interleaved rounds, each backend in turn with "
                        "budget/R per round, so that clock drift hits them alike; ms = median of the "
                        "rounds' medians (default 3 on a GPU, 1 on the CPU path; 1: each backend timed "
                        "in one block)")
    p.add_argument("--pause", type=float, default=None, metavar="S",
                   help="seconds the GPU idles before each backend's turn in a round, so that every "
                        "turn starts from the same clock and power state (default 0.1 on a GPU, 0 on "
                        "the CPU path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads for the NumPy path and the float64 reference (default: the "
                        "OPENBLAS/OMP_NUM_THREADS environment, else 1)")
    p.add_argument("--out", help="JSON path (default bench/results/DATE_GPU_PRESET.json); PNGs go beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the rows that would run, run nothing")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier runs' JSON files into one table, JSON (--out) and plots")
    return p.parse_args(argv)


def merge(args):
    rows, metas = {}, []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        metas.append(data["meta"])
        for r in data["rows"]:
            key = (r["group"], r["op"], r["dtype"], r["batch"], r["hq"], r["hkv"], r["lq"], r["lk"], r["d"],
                   r["causal"], r["backend"])
            # a later file wins; a row of a merged file keeps the commit it came from
            rows[key] = dict(r, commit=r.get("commit") or data["meta"].get("commit"))
    meta = dict(metas[0], merged_from=[Path(p).name for p in args.merge],
                commits=sorted({r["commit"] for r in rows.values() if r.get("commit")}))
    out = Path(args.out) if args.out else Path(args.merge[0]).with_name(Path(args.merge[0]).stem + "_merged.json")
    finish(list(rows.values()), meta, out, not args.no_plots)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    preset = "quick" if args.quick else ("full" if args.full else "headline")

    cupy, why_no_gpu = (None, "--device cpu") if args.device == "cpu" else C.detect_gpu()
    plan_gpu = cupy is not None or (args.dry_run and args.device == "gpu")
    if cupy is None and args.device == "gpu" and not args.dry_run:
        print(f"--device gpu: {why_no_gpu}", file=sys.stderr)
        return 2
    if args.budget is None:               # seconds of timed calls per row
        args.budget = (0.3 if args.quick else 1.0) if plan_gpu else (0.15 if args.quick else 0.5)
    if args.rounds is None:               # GPU clocks drift within a case; a CPU run is a smoke test
        args.rounds = 3 if plan_gpu else 1
    if args.pause is None:
        args.pause = 0.1 if plan_gpu else 0.0
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    if not plan_gpu:
        args.warmup = min(args.warmup, 1)  # NumPy has nothing to warm up beyond the first call
    if not plan_gpu:
        print(f"No usable CUDA GPU ({why_no_gpu}): running the CPU (NumPy) path on small sizes.",
              file=sys.stderr)

    import cupyattn
    ours = list(cupyattn.backends())
    torch_possible = plan_gpu and not args.no_torch
    if torch_possible and args.dry_run:
        torch, why_no_torch = ((None, "torch not installed") if importlib.util.find_spec("torch") is None
                               else (True, ""))
    elif torch_possible:
        torch, why_no_torch = C.import_torch()
    else:
        torch, why_no_torch = None, ("--no-torch" if args.no_torch else "CPU path")
    torch_names = list(TORCH_BACKENDS) if torch is not None else []
    impls = select_impls(ours, torch_names, _names(args.backend))
    cases = filter_cases(gpu_cases(preset) if plan_gpu else cpu_cases(preset), args)
    platform = "GPU" if plan_gpu else "CPU (NumPy)"

    if args.dry_run:
        print(f"{platform}, preset {preset}: {len(cases)} cases x {len(impls)} backends = "
              f"{len(cases) * len(impls)} rows; backends: {', '.join(impls)}"
              + ("" if torch is not None or not plan_gpu else f" (no torch rows: {why_no_torch})"))
        timing = {"budget_s": args.budget, "rounds": args.rounds, "warmup": args.warmup, "pause_s": args.pause}
        print(f"timing: {_timing_text(timing)}")
        for c in cases:
            print(f"  {c.label():58s} {c.flops / 1e9:10.1f} GFLOP  inputs {c.input_bytes / 2**20:8.1f} MiB")
        return 0

    if cupy is not None and torch is None:
        print(f"PyTorch rows skipped: {why_no_torch}", file=sys.stderr)
    xp = cupy if cupy is not None else np
    meta = C.environment(cupy, torch)
    meta.update(preset=preset, backends=impls, blas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                budget_s=args.budget, rounds=args.rounds, warmup=args.warmup, pause_s=args.pause, seed=args.seed,
                notes=["torch's is_causal is top-left aligned, ours bottom-right: identical in these rows "
                       "because every causal row has Lq == Lk (decode rows are non-causal)",
                       "flops: forward 4*B*Hq*Lq*Lk*D, halved for causal; fwdbwd counts 3.5x forward",
                       "peak_extra_bytes: allocated during one call beyond what existed before it "
                       "(outputs included); workspace_bytes = peak_extra_bytes - out_bytes",
                       "errors: max over 16 rows of the first and last (batch, head) against float64; "
                       "fwd rows compare out, fwdbwd rows compare dq",
                       "vs_torch[X] = torch X ms / our ms (>1: ours is faster)"])
    if cupy is None:
        meta["platform"] = "CPU (NumPy)"
    out = Path(args.out) if args.out else default_out(meta, preset)

    runner = Runner(args, xp, cupy, torch, cupyattn)
    progress = C.Progress(len(cases) * len(impls), enabled=not args.no_progress)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        rows.extend(runner.run_case(case, impls, progress))
    meta["wall_s"] = time.perf_counter() - t0
    finish(rows, meta, out, not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
