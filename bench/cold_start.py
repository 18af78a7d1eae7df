#!/usr/bin/env python
"""Cold start: first-call compile time of every kernel instantiation, then its load time from
CuPy's disk cache in a fresh process.

    python bench/cold_start.py                 # fresh temporary cache dir, removed afterwards
    python bench/cold_start.py --out bench/results/cold_start_h100.json

Each instantiation comes from `cupyattn._kernels.all_kernel_specs()` and is fetched with
`cupyattn._kernels.get_function(spec)`, the loader the backends use. Two child processes share
one empty CUPY_CACHE_DIR: the first compiles every instantiation (NVRTC + module load) and times
each; the second, a new process with a cold in-memory cache, gets each again, now read from disk.
CUDA context creation and NVRTC's own start-up are timed apart, so they do not land on the first
kernel. Without a usable GPU it says so (and lists what it would compile) and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

_TRIVIAL = r'extern "C" __global__ void cupyattn_cold_start_probe(float* x) { x[threadIdx.x] += 1.0f; }'


def _specs_for_device(kernels, cupy):
    major, minor = map(int, cupy.cuda.Device().compute_capability)
    out, skipped = [], []
    for spec in kernels.all_kernel_specs():
        if spec.hopper_only and (major, minor) != (9, 0):
            skipped.append(spec)
        else:
            out.append(spec)
    return out, skipped


def select_specs(specs, patterns):
    """Keep the specs whose source or name contains one of the comma-separated substrings."""
    if not patterns:
        return list(specs)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [s for s in specs if any(p in s.name or p in s.source for p in pats)]


def worker(phase: str, json_out: str, shard: str, patterns: str):
    """Run inside a child process whose CUPY_CACHE_DIR is set: time its share of instantiations."""
    t0 = time.perf_counter()
    import cupy
    import cupyattn  # noqa: F401 - registers the backends and their kernel specs
    from cupyattn import _kernels
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cupy.zeros(1, dtype=cupy.float32).sum()
    cupy.cuda.Device().synchronize()
    context_s = time.perf_counter() - t0

    # NVRTC start-up and CuPy's compile machinery, on a throwaway kernel (cached by phase "compile").
    t0 = time.perf_counter()
    probe = cupy.RawKernel(_TRIVIAL, "cupyattn_cold_start_probe")
    x = cupy.zeros(32, dtype=cupy.float32)
    probe((1,), (32,), (x,))
    cupy.cuda.Device().synchronize()
    nvrtc_init_s = time.perf_counter() - t0

    specs, skipped = _specs_for_device(_kernels, cupy)
    specs = select_specs(specs, patterns)
    index, count = map(int, shard.split("/"))
    specs = specs[index::count]
    results = []
    for spec in specs:
        rec = {"source": spec.source, "name": spec.name, "hopper_only": spec.hopper_only}
        t0 = time.perf_counter()
        try:
            fn = _kernels.get_function(spec)
            cupy.cuda.Device().synchronize()
            rec["seconds"] = time.perf_counter() - t0
            for attr in ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block"):
                try:
                    rec[attr] = int(getattr(fn, attr))
                except Exception:  # noqa: BLE001 - attribute names differ across CuPy versions
                    pass
        except Exception as e:  # noqa: BLE001
            rec["seconds"] = time.perf_counter() - t0
            rec["error"] = f"{type(e).__name__}: {C.first_line(e, 400)}"
        results.append(rec)
    payload = {"phase": phase, "import_s": import_s, "context_s": context_s, "nvrtc_init_s": nvrtc_init_s,
               "cache_dir": os.environ.get("CUPY_CACHE_DIR"), "kernels": results,
               "skipped": [{"source": s.source, "name": s.name, "why": "needs sm_90a"} for s in skipped]}
    Path(json_out).write_text(json.dumps(payload))


def run_phase(phase, cache_dir, timeout, jobs, patterns):
    """Run `jobs` child processes at once, each on every jobs-th instantiation; merge their reports."""
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache_dir))
    env.pop("CUPY_CACHE_IN_MEMORY", None)      # the disk cache must be used
    procs = []
    try:
        for i in range(jobs):
            fd, tmp = tempfile.mkstemp(suffix=".json", prefix=f"cold_{phase}_{i}_")
            os.close(fd)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", phase, "--_json", tmp,
                   "--_shard", f"{i}/{jobs}", "--filter", patterns or ""]
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True), tmp))
        reports = []
        deadline = time.monotonic() + timeout
        for proc, tmp in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"{phase} process failed (rc {proc.returncode}):\n{err[-3000:]}")
            reports.append(json.loads(Path(tmp).read_text()))
    finally:
        for proc, tmp in procs:
            if proc.poll() is None:
                proc.kill()
            if os.path.exists(tmp):
                os.unlink(tmp)
    merged = dict(reports[0])
    merged["kernels"] = [k for r in reports for k in r["kernels"]]
    merged["processes"] = jobs
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the figures as JSON here")
    p.add_argument("--cache-dir", help="CuPy cache dir to use (must be empty for true compile times; "
                                       "default: a fresh temporary one)")
    p.add_argument("--keep-cache", action="store_true", help="do not delete the temporary cache dir")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per phase")
    p.add_argument("--jobs", type=int, default=None,
                   help="compile in this many processes at once (default: min(8, CPUs/2)); NVRTC is "
                        "single-threaded, so with jobs <= physical cores each time stays that of a lone compile")
    p.add_argument("--filter", default="", help="only instantiations whose source or name contains one of "
                                                "these comma-separated substrings (e.g. flash_fwd,bfloat16)")
    p.add_argument("--list", action="store_true", help="list the instantiations and exit")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_json", help=argparse.SUPPRESS)
    p.add_argument("--_shard", default="0/1", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args._worker, args._json, args._shard, args.filter)
        return 0

    cupy, why = C.detect_gpu()
    import cupyattn  # noqa: F401
    from cupyattn import _kernels
    specs = select_specs(_kernels.all_kernel_specs(), args.filter)
    if cupy is None or args.list:
        if cupy is None:
            print(f"No usable CUDA GPU ({why}): cold-start timing needs one; nothing timed.")
        by_source = {}
        for s in specs:
            by_source[s.source] = by_source.get(s.source, 0) + 1
        print(f"{len(specs)} kernel instantiation(s) a GPU run would compile: "
              + ", ".join(f"{n} in {src}" for src, n in by_source.items())
              + ("" if args.list else " (--list shows them)"))
        if args.list:
            for s in specs:
                print(f"  {s.source:24s} {s.name}{'  (sm_90a only)' if s.hopper_only else ''}")
        return 0
    if not specs:
        print("No kernel instantiations registered (or none match --filter).")
        return 0
    jobs = max(1, min(args.jobs or min(8, (os.cpu_count() or 2) // 2), len(specs)))

    own_dir = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="cupyattn-cold-")) if own_dir else Path(args.cache_dir)
    if not own_dir and cache_dir.is_dir() and any(cache_dir.iterdir()):
        print(f"note: {cache_dir} is not empty; 'compile' times may be disk-cache loads", file=sys.stderr)
    try:
        print(f"compiling {len(specs)} instantiation(s) in {jobs} process(es) into {cache_dir} ...",
              file=sys.stderr)
        t0 = time.perf_counter()
        first = run_phase("compile", cache_dir, args.timeout, jobs, args.filter)
        compile_wall = time.perf_counter() - t0
        print(f"  {compile_wall:.0f} s; loading them again in one new process ...", file=sys.stderr)
        second = run_phase("load", cache_dir, args.timeout, 1, args.filter)
    finally:
        if own_dir and not args.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)

    meta = C.environment(cupy, None)
    loads = {(k["source"], k["name"]): k for k in second["kernels"]}
    rows, table = [], []
    for k in first["kernels"]:
        again = loads.get((k["source"], k["name"]), {})
        row = {"source": k["source"], "name": k["name"], "compile_s": k["seconds"],
               "load_s": again.get("seconds"), "num_regs": k.get("num_regs"),
               "local_size_bytes": k.get("local_size_bytes"), "shared_size_bytes": k.get("shared_size_bytes"),
               "error": k.get("error") or again.get("error")}
        rows.append(row)
        table.append([k["source"], k["name"], f"{k['seconds']:.2f}",
                      "-" if row["load_s"] is None else f"{1000 * row['load_s']:.1f}",
                      row["num_regs"] if row["num_regs"] is not None else "",
                      row["local_size_bytes"] if row["local_size_bytes"] is not None else "",
                      (row["error"] or "")[:80]])
    print(f"cold start on {meta.get('gpu')} (sm_{meta.get('compute_capability', '?').replace('.', '')}), "
          f"CuPy {meta.get('cupy')}, CUDA {meta.get('cuda_runtime')}, commit {meta.get('commit')}")
    print(f"process start: import {first['import_s']:.2f} s, CUDA context {first['context_s']:.2f} s, "
          f"NVRTC start-up {first['nvrtc_init_s']:.2f} s (new process, warm disk cache: import "
          f"{second['import_s']:.2f} s, context {second['context_s']:.2f} s, first cached kernel "
          f"{second['nvrtc_init_s']:.2f} s)")
    print()
    print(C.format_table(["source", "instantiation", "compile s", "load ms", "regs", "local B", "error"],
                         table, right={2, 3, 4, 5}))
    total_c = sum(r["compile_s"] for r in rows)
    total_l = sum(r["load_s"] or 0 for r in rows)
    print(f"\ntotal: compile {total_c:.1f} s of compiler time ({compile_wall:.0f} s wall in {jobs} processes), "
          f"load from disk cache {1000 * total_l:.0f} ms ({len(rows)} instantiation(s))")
    for s in first.get("skipped", []):
        print(f"skipped (needs sm_90a): {s['name']}")
    if args.out:
        meta.update(jobs=jobs, compile_wall_s=compile_wall, filter=args.filter)
        C.write_json(Path(args.out), {"meta": meta, "compile_phase": {k: v for k, v in first.items() if k != "kernels"},
                                      "load_phase": {k: v for k, v in second.items() if k != "kernels"},
                                      "kernels": rows})
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
