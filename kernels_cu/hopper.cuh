// Hopper (sm_90a) building blocks shared by the wgmma kernels (flash_fwd_sm90.cu, flash_bwd_sm90.cu):
// tensor maps, mbarriers, TMA loads, shared-memory matrix descriptors, the wgmma wrappers and
// fences, named barriers, and the accumulator -> A-fragment conversion. Only for sm_90a.
#pragma once
#include "common.cuh"

namespace sm90 {

// shared with the other kernels (common.cuh)
// shared with the other kernels (common.cuh)
using cupyattn::kLn2;
using cupyattn::pack2;
using cupyattn::quad_max;
using cupyattn::quad_sum;
using cupyattn::smem_u32;

// A CUtensorMap, opaque, 128 bytes, 64-byte aligned; passed by value as a __grid_constant__ param.
struct alignas(64) TmaMap {
    unsigned long long v[16];
};

// ---- mbarrier ---------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// Blocks until the phase with the given parity has completed. A freshly initialised barrier is in
// phase 0; waiting for parity 1 on it returns at once (the "previous" phase counts as complete).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// ---- TMA ------------------------------------------------------------------------------------
__device__ __forceinline__ void tma_load_5d(unsigned dst, const TmaMap* map, unsigned bar,
                                            int c0, int c1, int c2, int c3, int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];\n"
        :: "r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar),
           "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
        : "memory");
}
// TMA store (shared -> global) of one box at the given coordinates, completed through the issuing
// thread's bulk async-groups: commit with bulk_commit_group, then bulk_wait_group_read<N> (the
// source shared memory may be reused) or bulk_wait_group<N> (the global writes are done). Rows and
// columns outside the tensor map's extents are not written. The shared-memory writes it reads must
// be made visible to the async proxy first (fence_proxy_async_shared by every writer, then a barrier).
__device__ __forceinline__ void tma_store_5d(const TmaMap* map, unsigned src, int c0, int c1, int c2, int c3, int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];\n"
        :: "l"(reinterpret_cast<unsigned long long>(map)), "r"(src),
           "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
        : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait_group() { asm volatile("cp.async.bulk.wait_group %0;\n" :: "n"(N) : "memory"); }
// Orders this thread's earlier generic-proxy shared-memory accesses before later async-proxy ones
// (TMA, wgmma) of whoever synchronises with it afterwards.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<unsigned long long>(map)) : "memory");
}

// ---- wgmma ----------------------------------------------------------------------------------
// Shared-memory matrix descriptor (PTX ISA "matrix descriptor"): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base
// offset (0: every swizzle atom is 1024-byte aligned here), 62-63 swizzle mode (1 = 128B).
//  K-major, 128B swizzle: rows of 128 bytes, SBO = 1024 (next group of 8 rows); LBO unused (1).
//    Stepping K by 16 elements inside a 64-element chunk adds 32 bytes to the start address.
//  MN-major, 128B swizzle (V as the B operand, N = head dim contiguous): LBO = byte distance
//    between 64-element column chunks of N, SBO = 1024 (next group of 8 K rows = keys).
__device__ __forceinline__ unsigned long long make_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    unsigned long long d = 0;
    d |= static_cast<unsigned long long>((addr & 0x3FFFFu) >> 4);
    d |= static_cast<unsigned long long>((lbo >> 4) & 0x3FFFu) << 16;
    d |= static_cast<unsigned long long>((sbo >> 4) & 0x3FFFu) << 32;
    d |= 1ull << 62;
    return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }

// Keeps the compiler from moving accesses to accumulator registers across wgmma fences/waits.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}

template <typename T, int N> struct Wgmma;
template <typename T, int N> struct WgmmaT;

// ---- wgmma.mma_async m64nNk16 wrappers (wgmma_ops.cuh, once per input type) ----------------------
// Accumulator fragment (PTX ISA, wgmma D for m64nNk16): warp w of the warpgroup owns rows
// 16w..16w+15; lane = 4g + t holds, for each 8-column chunk j, d[4j+0], d[4j+1] at row 16w+g,
// columns 8j+2t, 8j+2t+1, and d[4j+2], d[4j+3] at row 16w+g+8, same columns.
// A from registers (16-bit types): a[0] = (row g, k 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..),
// a[3] = (g+8, 2t+8..), each packing the lower k in the low half.

#define WGMMA_T __half
#define WGMMA_TY "f16"
#include "wgmma_ops.cuh"
#undef WGMMA_T
#undef WGMMA_TY
#define WGMMA_T __nv_bfloat16
#define WGMMA_TY "bf16"
#include "wgmma_ops.cuh"
#undef WGMMA_T
#undef WGMMA_TY

// ---- small helpers ----------------------------------------------------------------------------
__device__ __forceinline__ void named_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}


// Stores four 8x8 matrices of 16-bit elements (stmatrix .x4): lane 8i+r gives the shared address
// of row r of matrix i (16 contiguous bytes, 16-byte aligned); register i holds matrix i's fragment
// in the mma accumulator layout (lane 4g+t: row g, columns 2t, 2t+1, the lower column in the low
// half). The whole warp must execute it.
__device__ __forceinline__ void stmatrix_x4(unsigned addr, unsigned r0, unsigned r1, unsigned r2, unsigned r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
                 :: "r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// P (accumulator layout) -> A-operand fragments. Key step kk covers columns 16kk..16kk+15, which
// are accumulator chunks 2kk and 2kk+1, so the mapping is the identity on registers:
//   a0 = row g, keys 2t..2t+1 (sc[8kk+0,1]); a1 = row g+8, same keys (sc[8kk+2,3]);
//   a2 = row g, keys 2t+8..2t+9 (sc[8kk+4,5]); a3 = row g+8, same keys (sc[8kk+6,7]).
template <typename T, int BN>
__device__ __forceinline__ void to_a_frags(const float (&sc)[BN / 2], unsigned (&pa)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
        pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
}

// A position in a shared-memory ring: stage index and the parity of its current fill.
struct RingPos {
    int stage = 0;
    unsigned phase = 0;
    template <int STAGES>
    __device__ __forceinline__ void advance() {
        if (++stage == STAGES) { stage = 0; phase ^= 1u; }
    }
};

}  // namespace sm90
