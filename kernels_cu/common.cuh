// Shared device helpers for the cupyattn kernels (sm_80+): tensor-core mma, ldmatrix, cp.async,
// type conversion and exp2 helpers. Generic on purpose: no attention logic lives here.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cupyattn {

constexpr float kLog2e = 1.4426950408889634f;   // log2(e): exp(x) = exp2(x * log2e)
constexpr float kLn2 = 0.6931471805599453f;     // ln(2):   log(x) = log2(x) * ln2

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// ---------------------------------------------------------------------------------------------
// Shared-memory addresses and cp.async (16-byte copies global -> shared, zero-fill when src_bytes=0)

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Copies src_bytes (0 or 16) from global and zero-fills the rest of the 16 destination bytes.
__device__ __forceinline__ void cp_async_16(unsigned dst_smem, const void* src_gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst_smem), "l"(src_gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N most recent groups of this thread are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
// Without .trans, lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of each matrix;
// with .trans it receives rows 2(l%4), 2(l%4)+1 of column l/4.

__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                            unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                                  unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// ---------------------------------------------------------------------------------------------
// mma.sync m16n8k16, A row-major (4 regs), B column-major (2 regs), fp32 accumulate in place.
// Fragment layout (g = lane/4, t = lane%4):
//   A: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)      [row, k]
//   B: b0 (k=2t..2t+1, n=g)  b1 (k=2t+8.., n=g)
//   C: c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)                              [row, n]

template <typename T> struct MmaOp;

template <> struct MmaOp<__half> {
    __device__ __forceinline__ static void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct MmaOp<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    MmaOp<T>::run(c, a, b0, b1);
}

// ---------------------------------------------------------------------------------------------
// Conversions

// Two floats to a packed pair of T; `lo` lands in the low 16 bits (the lower column).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);

template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------------------------
// exp2 / log2 (ex2.approx: exp2(-inf) = 0, exp2(NaN) = NaN)

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Max over the 4 lanes of a quad (lanes sharing one mma row) and the sum likewise.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// ---------------------------------------------------------------------------------------------
// Global -> shared tile loads shared by the flash kernels (sm80 forward and backward)

// One element of an additive bias of run-time dtype (0 half, 1 bfloat16, 2 float, 3 double).
__device__ __forceinline__ float load_bias(const void* p, long long off, int dtype) {
    switch (dtype) {
        case 0: return __half2float(static_cast<const __half*>(p)[off]);
        case 1: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
        case 2: return static_cast<const float*>(p)[off];
        default: return static_cast<float>(static_cast<const double*>(p)[off]);
    }
}

// Loads rows [0, ROWS) of a tile whose row r starts at g + r * ld into s (row pitch HD + 8
// elements: the 16 extra bytes keep ldmatrix free of bank conflicts); rows >= nrows and columns
// >= ncols become zero. vec: 16-byte cp.async (needs ncols % 8 == 0 and 16-byte aligned rows),
// else element-wise loads and stores. `safe` is any valid global address: the source operand of
// a zero-filling cp.async must still be one.
template <typename T, int ROWS, int HD, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, long long ld, int nrows, int ncols,
                                          bool vec, int tid, const T* safe) {
    constexpr int LDS = HD + 8;
    if (vec) {
        constexpr int CPR = HD / 8;
        constexpr int TOTAL = ROWS * CPR;
#pragma unroll 1
        for (int c0 = 0; c0 < TOTAL; c0 += NT) {
            const int c = c0 + tid;
            if (TOTAL % NT == 0 || c < TOTAL) {
                const int r = c / CPR, ch = c % CPR;
                const bool ok = r < nrows && ch * 8 < ncols;
                const T* src = ok ? g + static_cast<long long>(r) * ld + ch * 8 : safe;
                cp_async_16(smem_u32(s + r * LDS + ch * 8), src, ok ? 16 : 0);
            }
        }
    } else {
        const unsigned short* gs = reinterpret_cast<const unsigned short*>(g);
        unsigned short* ss = reinterpret_cast<unsigned short*>(s);
#pragma unroll 1
        for (int e = tid; e < ROWS * HD; e += NT) {
            const int r = e / HD, c = e % HD;
            unsigned short val = 0;
            if (r < nrows && c < ncols) val = gs[static_cast<long long>(r) * ld + c];
            ss[r * LDS + c] = val;
        }
    }
}

}  // namespace cupyattn
