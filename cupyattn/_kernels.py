"""Loading, compiling and caching the CUDA kernels in kernels_cu/.

Kernels are C++ templates; one instantiation is named by a C++ expression such as
`flash_fwd<__nv_bfloat16, 128, 128>` and compiled on first use with NVRTC through
`cupy.RawModule(name_expressions=...)`. Compiled functions are cached in memory per
(source, instantiation, arch, options); CuPy's own disk cache keeps the binaries across processes.

Every kernel backend lists the instantiations it can ever request (`KernelSpec`s) so that CI can
compile all of them ahead of time, without a GPU, through the low-level NVRTC bindings
(`compile_offline`), and fail on compile errors or on local-memory spills.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

BASE_OPTIONS = ("-std=c++17",)


def kernel_dir() -> Path:
    """kernels_cu/ ships inside the installed package (cupyattn/kernels_cu) and sits beside the
    package in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kernels_cu/ not found next to {here}; the installation is incomplete")


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    return (kernel_dir() / name).read_text()


@functools.lru_cache(maxsize=None)
def headers_digest() -> str:
    """CuPy's disk cache is keyed by the source text and options, not by included headers; this
    digest goes into the options so an edited header cannot reuse a stale binary."""
    h = hashlib.sha256()
    for path in sorted(kernel_dir().glob("*.cuh")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instantiation a backend may request."""
    source: str                  # file in kernels_cu/
    name: str                    # C++ name expression of the template instantiation
    hopper_only: bool = False    # uses sm_90a instructions (wgmma, setmaxnreg)


def arch_for(major: int, minor: int, hopper_only: bool = False) -> str:
    if hopper_only:
        if (major, minor) != (9, 0):
            raise ValueError(f"kernel needs sm_90a, device is sm_{major}{minor}")
        return "sm_90a"
    return f"sm_{major}{minor}"


def _include_dirs() -> List[str]:
    dirs = [str(kernel_dir())]
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    dirs.append("/usr/local/cuda/include")
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def compile_options(arch: str, extra: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    return (BASE_OPTIONS + (f"-arch={arch}", f"-DCUPYATTN_HEADERS_DIGEST=0x{headers_digest()}")
            + tuple(f"-I{d}" for d in _include_dirs()) + tuple(extra))


@functools.lru_cache(maxsize=None)
def _module(source: str, names: Tuple[str, ...], options: Tuple[str, ...]):
    import cupy
    return cupy.RawModule(code=read_source(source), options=options, name_expressions=names)


def get_function(spec: KernelSpec, device=None, extra_options: Tuple[str, ...] = ()):
    """The compiled kernel for `spec` on `device` (default: the current CuPy device)."""
    import cupy
    device = device or cupy.cuda.Device()
    return _function(spec, device.id, tuple(extra_options))


@functools.lru_cache(maxsize=None)
def _function(spec: KernelSpec, device_id: int, extra_options: Tuple[str, ...]):
    # One Function object per (kernel, device, options): the shared-memory limit set on it below
    # must stay with the object that launches (a fresh object per call would lose it).
    import cupy
    major, minor = map(int, cupy.cuda.Device(device_id).compute_capability)
    options = compile_options(arch_for(major, minor, spec.hopper_only), extra_options)
    return _module(spec.source, (spec.name,), options).get_function(spec.name)


_dynamic_shared_limit = {}   # id(function) -> (function, bytes allowed); holding the function keeps ids unique


def set_dynamic_shared_memory(function, nbytes: int) -> None:
    """Kernels using more than 48 KB of dynamic shared memory must raise their limit first."""
    if nbytes <= 48 * 1024:
        return
    known = _dynamic_shared_limit.get(id(function))
    if known is None or known[1] < nbytes:
        function.max_dynamic_shared_size_bytes = nbytes
        _dynamic_shared_limit[id(function)] = (function, nbytes)


def launch(function, blocks: int, threads: int, args, shared_mem: int = 0) -> None:
    """Launch `function` (from get_function) on the current stream with a 1-D grid and block.

    args: numpy scalars and numpy arrays, each passed by value as its bytes (a TMA tensor map is
    a one-element structured array of 128 bytes). This goes to cuLaunchKernel directly, the values
    of all arguments in one buffer: CuPy's own launch converts every argument on every call, and
    for a structured array that means building its __array_interface__ in Python (H200 host, the
    Hopper forward's 19 arguments: ~21 us of a ~115 us call). The driver copies the values during
    the call and reads as many as the kernel declares (trailing extras are ignored, as with
    CuPy's launch); errors come back as CuPy's CUDADriverError."""
    import cupy
    from cupy_backends.cuda.api import driver
    blobs = [a.tobytes() for a in args]
    sizes = tuple(map(len, blobs))
    # one value buffer and pointer array per argument layout and host thread (two threads may
    # launch at once), reused: building them costs more than the copy
    buffers = _launch_buffers.__dict__
    layout = buffers.get(sizes)
    if layout is None:
        values = ctypes.create_string_buffer(max(1, sum(sizes)))
        base = ctypes.addressof(values)
        offsets = itertools.accumulate((0,) + sizes[:-1])
        pointers = (ctypes.c_void_p * max(1, len(sizes)))(*[base + o for o in offsets])
        layout = buffers[sizes] = (values, pointers, base, ctypes.addressof(pointers))
    _, _, base, params = layout
    joined = b"".join(blobs)
    ctypes.memmove(base, joined, len(joined))
    launch_args = (_function_ptr(function), blocks, 1, 1, threads, 1, 1, shared_mem,
                   cupy.cuda.get_current_stream().ptr, params, 0)
    try:
        driver.launchKernel(*launch_args)
    except driver.CUDADriverError as exc:
        # A host thread whose first CUDA work this is has no current context (CuPy's own launch
        # makes the device's primary one current first); cudaFree(0) does that, then launch again.
        if getattr(exc, "status", None) != _CUDA_ERROR_INVALID_CONTEXT:
            raise
        cupy.cuda.runtime.free(0)
        driver.launchKernel(*launch_args)


_CUDA_ERROR_INVALID_CONTEXT = 201
_launch_buffers = threading.local()


# (id(function), device) -> (function, CUfunction handle); holding the function keeps ids unique.
# Per device: a RawKernel shared by two devices of one arch loads a module on each.
_function_ptrs = {}


def _function_ptr(function) -> int:
    import cupy
    key = (id(function), cupy.cuda.runtime.getDevice())
    entry = _function_ptrs.get(key)
    if entry is None:
        entry = _function_ptrs[key] = (function, function.kernel.ptr)
    return entry[1]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation without a GPU (the CI compile gate).

@dataclass
class CompileReport:
    spec: KernelSpec
    arch: str
    ok: bool
    registers: Optional[int]
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int
    log: str

    @property
    def spills(self) -> bool:
        # A register array indexed at run time lands in a stack frame with zero "spills": count both.
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack_frame > 0

    def line(self) -> str:
        if not self.ok:
            return f"FAIL {self.arch:7} {self.spec.name}"
        return (f"{'SPILL' if self.spills else 'ok':5} {self.arch:7} regs={self.registers!s:>4} "
                f"smem={self.shared_bytes:>6} stack={self.stack_frame:>4} "
                f"spill(st/ld)={self.spill_stores}/{self.spill_loads}  {self.spec.name}")


_RESOURCE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_SMEM = re.compile(r"(\d+) bytes smem")


def compile_offline(spec: KernelSpec, arch: str) -> CompileReport:
    """Compile one instantiation for `arch` with NVRTC and read ptxas' resource report.

    Works without a GPU (CuPy's high-level compile asks the device for its arch; this does not).
    """
    from cupy.cuda import nvrtc
    options = list(compile_options(arch, ("--ptxas-options=-v",)))
    program = nvrtc.createProgram(read_source(spec.source), spec.source, [], [])
    try:
        nvrtc.addNameExpression(program, spec.name)
        ok = True
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(program)
        if ok:
            nvrtc.getLoweredName(program, spec.name)  # fails if the instantiation did not happen
    finally:
        nvrtc.destroyProgram(program)

    def grab(pattern, default=0):
        m = pattern.findall(log)
        return m[-1] if m else default

    regs = grab(_RESOURCE, None)
    spill = grab(_SPILL, ("0", "0"))
    return CompileReport(spec=spec, arch=arch, ok=ok, registers=int(regs) if regs else None,
                         spill_stores=int(spill[0]), spill_loads=int(spill[1]),
                         stack_frame=int(grab(_STACK)), shared_bytes=int(grab(_SMEM)), log=log)


def all_kernel_specs() -> List[KernelSpec]:
    """Every instantiation any registered backend can request."""
    from . import _registry
    specs: List[KernelSpec] = []
    for backend in _registry.backends():
        specs.extend(getattr(backend, "kernel_specs", lambda: [])())
    return list(dict.fromkeys(specs))


def compile_gate(archs: Iterable[str] = ("sm_80", "sm_90a"), jobs: int = 0) -> int:
    """Compile every instantiation for every arch in `jobs` processes (0 = one per CPU), print
    one line each, and return the number that failed or used local memory."""
    from concurrent.futures import ProcessPoolExecutor
    work = [(spec, arch) for spec in all_kernel_specs() for arch in archs
            if not (spec.hopper_only and arch != "sm_90a")]
    bad = 0
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        for report in pool.map(_compile_one, work):
            print(report.line(), flush=True)
            if not report.ok or report.spills:
                bad += 1
                if not report.ok:
                    print(report.log, flush=True)
    print(f"{len(work)} instantiations compiled, {bad} failed or spilled", flush=True)
    return bad


def _compile_one(job):
    return compile_offline(*job)


if __name__ == "__main__":
    import sys
    sys.exit(1 if compile_gate() else 0)
