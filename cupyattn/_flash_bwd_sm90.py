"""Hopper (sm_90a) flash-attention backward main kernel: TMA + mbarrier ring + wgmma
(kernels_cu/flash_bwd_sm90.cu). The flash backward (_flash_bwd.flash_backward) runs it in place of
the mma.sync main kernel where it applies; the prep kernel (delta, lse2) is shared.

    supports(problem, deterministic) -> list[str]   why this kernel cannot run (empty = it can)
    kernel_specs() -> list[KernelSpec]
    run_main(problem, dout, lse2, delta, dq, dk, dv)  dq (zeroed) += ..., dk, dv written

Inputs are read in place through TMA tensor maps (the forward's helpers in _flash_sm90); dout is
contiguous; dq (float32, atomics), dk, dv (the input dtype, or float32 where the caller still sums
them over broadcast batch entries) and the row vectors lse2 / delta are contiguous, as
flash_backward allocates them.
"""
from __future__ import annotations

import functools
import math
from typing import List

import numpy as np

from . import _flash_sm90
from ._kernels import KernelSpec, get_function, set_dynamic_shared_memory
from ._problem import BFLOAT16, FLOAT16, Problem

SOURCE = "flash_bwd_sm90.cu"
HEAD_DIMS = (64, 128)    # the dQ product gives each consumer warpgroup D/2 columns
BLOCK_N = 128            # keys per block
BLOCK_M = 64             # query rows per tile
STAGES = 2               # Q / dO ring depth
THREADS = 384
_CTYPES = {FLOAT16: "__half", BFLOAT16: "__nv_bfloat16"}

# False keeps this kernel out (the mma.sync main kernel runs instead); tests use it.
HOPPER_BACKWARD = True


def kernel_name(dtype, head_dim: int) -> str:
    return f"flash_bwd_sm90_kernel<{_CTYPES[np.dtype(dtype)]}, {head_dim}, {STAGES}>"


@functools.lru_cache(maxsize=None)
def spec_for(dtype, head_dim: int) -> KernelSpec:
    return KernelSpec(source=SOURCE, name=kernel_name(dtype, head_dim), hopper_only=True)


def kernel_specs() -> List[KernelSpec]:
    return [spec_for(dt, d) for dt in (FLOAT16, BFLOAT16) for d in HEAD_DIMS]


def row_pitch(len_q: int) -> int:
    """Entries per (batch, head) row of the lse2 / delta vectors this kernel reads: whole 64-row
    tiles (its bulk copies move 256 bytes, 16-byte aligned), the pads set to lse2 = +inf and
    delta = 0 so that padded queries get P = 0."""
    return -(-len_q // BLOCK_M) * BLOCK_M


def smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one block; mirrors sm90_bwd::Plan in the kernel source."""
    kv = BLOCK_N * head_dim * 2
    q = BLOCK_M * head_dim * 2
    ds = BLOCK_N * BLOCK_M * 2
    rows = STAGES * 2 * BLOCK_M * 4
    return 2 * kv + 2 * STAGES * q + 2 * ds + rows + 8 * (1 + 2 * STAGES) + 1024


assert all(smem_bytes(d) <= 227 * 1024 for d in HEAD_DIMS)


def supports(problem: Problem, deterministic: bool = False) -> List[str]:
    """Reasons this kernel cannot compute the backward of `problem` (empty list = it can)."""
    if not HOPPER_BACKWARD:
        return ["switched off (cupyattn._flash_bwd_sm90.HOPPER_BACKWARD = False)"]
    reasons = ["deterministic=True (the Hopper backward adds dQ up with atomics)"] if deterministic else []
    reasons += _flash_sm90.tma_kernel_reasons(problem, HEAD_DIMS, "Hopper backward", "the mma.sync backward")
    blocks = -(-problem.len_k // BLOCK_N) * problem.num_heads_kv * problem.batch_size
    if blocks >= 2**31:
        reasons.append("more than 2^31 - 1 blocks in one launch")
    return reasons


def run_main(problem: Problem, dout, lse2, delta, dq, dk, dv) -> None:
    """The main kernel over every launch: dq += dS K * scale (atomics; dq must start at zero),
    dk = dS^T Q * scale, dv = P^T dO. dout contiguous batch_shape + (Hq, Lq, D) in the input
    dtype; lse2, delta float32 (batch, Hq, row_pitch(Lq)); dq contiguous float32; dk, dv
    contiguous, both float32 or both in the input dtype (then written final)."""
    import cupy
    D, Lq, Lk = problem.head_dim, problem.len_q, problem.len_k
    Hq, Hkv = problem.num_heads_q, problem.num_heads_kv
    dtype = problem.dtype
    q, k, v = problem.q, problem.k, problem.v
    split = _flash_sm90.batch_split(problem, (q, k, v, dout))
    (nb0, _), (nb1, _) = split[1], split[2]
    per_launch = nb0 * nb1
    num_n_blocks = -(-Lk // BLOCK_N)
    grid = num_n_blocks * per_launch * Hkv
    fn = get_function(spec_for(dtype, D), cupy.cuda.Device(problem.device_id))
    nbytes = smem_bytes(D)
    set_dynamic_shared_memory(fn, nbytes)
    scale = float(problem.scale)
    scale_log2 = np.float32(scale * math.log2(math.e))
    pitch = row_pitch(Lq)
    if dk.dtype != dv.dtype or dk.dtype not in (np.dtype(np.float32), dtype):
        raise TypeError(f"dk, dv must both be float32 or both {dtype}, not {dk.dtype}, {dv.dtype}")
    kv_in_t = np.int32(dk.dtype == dtype)
    kv_item = dk.dtype.itemsize
    q_rows, kv_rows = per_launch * Hq * Lq, per_launch * Hkv * Lk
    shapes = ((Hq, Lq, BLOCK_M), (Hkv, Lk, BLOCK_N), (Hkv, Lk, BLOCK_N), (Hq, Lq, BLOCK_M))
    for launch, idx in _flash_sm90.launch_indices(split):
        maps, bcast = _flash_sm90.launch_maps((q, k, v, dout), shapes, idx, split, dtype, D)
        qo, ko = launch * q_rows, launch * kv_rows
        fn((grid,), (THREADS,),
           (maps[0], maps[1], maps[2], maps[3],
            np.uint64(lse2.data.ptr + 4 * per_launch * Hq * pitch * launch),
            np.uint64(delta.data.ptr + 4 * per_launch * Hq * pitch * launch),
            np.uint64(dq.data.ptr + 4 * qo * D), np.uint64(dk.data.ptr + kv_item * ko * D),
            np.uint64(dv.data.ptr + kv_item * ko * D),
            np.int32(Lq), np.int32(Lk), np.int32(Hq), np.int32(Hkv), np.int32(problem.group_size),
            np.int32(nb1), np.int32(num_n_blocks), np.int32(problem.causal), np.int32(bcast & 0x1FF),
            scale_log2, np.float32(scale), kv_in_t),
           shared_mem=nbytes)
