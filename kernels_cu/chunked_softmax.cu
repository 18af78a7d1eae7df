// The chunked backend's fused steps between its cuBLAS products (see cupyattn/_chunked.py).
//
// A chunk's scores S are a (rows, n_keys) block in the accumulation type (float, or double for
// double inputs) with row pitch `pitch` elements (pitch >= n_keys, a multiple of 8, and the
// buffer 16-byte aligned, so every row starts 16-byte aligned and the kernels use 16-byte
// vector loads; the padding columns are never used as scores). P (and dS) use the same pitch.
// Row `row` of the chunk is (head ih, group ig, query ir) with
//   row = (ih * ng + ig) * nr + ir.
// Everything else (mask/bias, lse, dO, O) is read in place through element strides for
// (ih, ig, ir[, column]); broadcast axes have stride 0 and are never expanded.
//
// Launch shape (all kernels): `tpr` threads per row (a power of two, <= 512), blockDim.x / tpr
// rows per block (blockDim.x <= 512), grid = ceil(rows / (blockDim.x / tpr)). Each thread handles
// the vectors lane, lane + tpr, ... of its row (N = 16 / sizeof(A) elements per vector), except
// in the forward's register rows (below).
//
// chunk_softmax<T, MaskT, RECOMPUTE, VPT>:
//   s = S * scale (+ bias); hidden keys (causal: key j > ir + causal_offset; bool mask false) = -inf
//   forward   (RECOMPUTE=false): P = exp(s - max) * (1 / sum), lse = max + log(sum)
//     VPT > 0, register rows: the row lives in registers, VPT vectors per thread (the host
//       guarantees nv <= VPT * tpr, tpr >= 32 and, with a mask, unit key stride m_sk == 1;
//       `resident` is ignored). Warp w of the row holds vectors w*32*VPT + i*32 + (lane & 31),
//       i < VPT: every load issues at once (fixed offsets from one address, 512 contiguous bytes
//       per warp and instruction), then the max (one reduction), exp and sum (one reduction) in
//       registers and the P write. One read of S, no shared memory but the reductions'.
//     VPT = 0, rows too long for the registers (or masks with other key strides):
//       resident = 1: S is read once into dynamic shared memory (rows_per_block * nv * 16
//         bytes), then max, exp/sum and the P write run from shared memory.
//       resident = 0 (rows too long for shared memory): online max/sum over S, then a second
//         read of S writes P.
//   recompute (RECOMPUTE=true, VPT = 0): P = exp(s - lse) from the saved lse (backward), one pass.
//   Rows with no visible key give P = 0 and lse = -inf; NaN propagates like the eager backend
//   (a NaN score makes the row's sum, P and lse NaN). Scores of keys a row cannot see are not
//   read (vectors entirely above the causal diagonal are skipped); P is written for every key
//   j < n_keys (zeros where hidden), as the next product reads the whole block.
//   P is written in T (the input dtype); it may alias S when T is the accumulation type
//   (each element is read and written by the same thread, every read before any write).
// chunk_dscores<T>: delta = sum_d dO*O, dS = P * (dP - delta) * scale, written in T over P
//   (same element, same thread).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace chunked {

struct NoMask {};
template <typename M> struct IsNoMask { static constexpr bool value = false; };
template <> struct IsNoMask<NoMask> { static constexpr bool value = true; };

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }   // ignores NaN
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

// 16-byte vectors of the accumulation type: 4 floats or 2 doubles.
template <typename A> struct Vec;
template <> struct Vec<float> { static constexpr int N = 4; };
template <> struct Vec<double> { static constexpr int N = 2; };

__device__ __forceinline__ void load_vec(const float* p, float (&e)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    e[0] = v.x; e[1] = v.y; e[2] = v.z; e[3] = v.w;
}
__device__ __forceinline__ void load_vec(const double* p, double (&e)[2]) {
    const double2 v = *reinterpret_cast<const double2*>(p);
    e[0] = v.x; e[1] = v.y;
}
__device__ __forceinline__ void store_vec(float* p, const float (&e)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(e[0], e[1], e[2], e[3]);
}
__device__ __forceinline__ void store_vec(double* p, const double (&e)[2]) {
    *reinterpret_cast<double2*>(p) = make_double2(e[0], e[1]);
}
// 4 half values from/to 8 bytes (element 0 in the low half-word).
__device__ __forceinline__ unsigned bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ float from_bits(unsigned b, __half*) { return __half2float(__ushort_as_half((unsigned short)b)); }
__device__ __forceinline__ float from_bits(unsigned b, __nv_bfloat16*) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)b)); }
__device__ __forceinline__ __half round_to(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 round_to(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }

template <typename H>
__device__ __forceinline__ void store_vec(H* p, const float (&e)[4]) {
    uint2 u;
    u.x = bits(round_to(e[0], (H*)0)) | (bits(round_to(e[1], (H*)0)) << 16);
    u.y = bits(round_to(e[2], (H*)0)) | (bits(round_to(e[3], (H*)0)) << 16);
    *reinterpret_cast<uint2*>(p) = u;
}
template <typename H>
__device__ __forceinline__ void load_vec(const H* p, float (&e)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    e[0] = from_bits(u.x & 0xffffu, (H*)0); e[1] = from_bits(u.x >> 16, (H*)0);
    e[2] = from_bits(u.y & 0xffffu, (H*)0); e[3] = from_bits(u.y >> 16, (H*)0);
}

// Mask handling: `apply` turns the scaled score into the visible score.
template <typename MaskT, typename A> struct MaskOp {      // additive bias of type MaskT
    __device__ __forceinline__ static A apply(A s, const MaskT* m, long long off) {
        return s + (A)to_acc(m[off]);
    }
};
template <typename A> struct MaskOp<bool, A> {
    __device__ __forceinline__ static A apply(A s, const bool* m, long long off) {
        return m[off] ? s : neg_inf<A>();
    }
};
template <typename A> struct MaskOp<NoMask, A> {
    __device__ __forceinline__ static A apply(A s, const NoMask*, long long) { return s; }
};

// Online (max, sum) pair: sum is relative to max. NaN in a score makes sum NaN.
template <typename A>
__device__ __forceinline__ void online_add(A& m, A& l, A s) {
    if (s == neg_inf<A>()) return;               // contributes exp(-inf) = 0
    if (s > m) {
        l = l * acc_exp(m - s) + (A)1;           // m = -inf: l is 0 and exp(-inf) = 0
        m = s;
    } else {
        l += acc_exp(s - m);                     // NaN s: l becomes NaN
    }
}

template <typename A>
__device__ __forceinline__ void online_merge(A& m, A& l, A m2, A l2) {
    const A mx = m2 > m ? m2 : m;              // maxima are never NaN (online_add skips NaN)
    if (mx == neg_inf<A>()) {
        l = l + l2;
    } else {
        A a = (m == neg_inf<A>()) ? (A)0 : acc_exp(m - mx);
        A b = (m2 == neg_inf<A>()) ? (A)0 : acc_exp(m2 - mx);
        // keep NaN sums NaN (NaN * 0 = NaN)
        l = l * a + l2 * b;
    }
    m = mx;
}

template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

// Reductions over the tpr threads of one row (tpr a power of two; groups never straddle a warp
// when tpr < 32, and are whole warps when tpr >= 32). Every thread of the block must call them
// (they synchronise the block once when tpr > 32); `red` holds one value per warp and serves
// ONE reduction per kernel launch (no barrier before its writes: give each reduction its own).
struct SumOp {
    template <typename A> __device__ __forceinline__ static A op(A a, A b) { return a + b; }
};
struct MaxOp {
    template <typename A> __device__ __forceinline__ static A op(A a, A b) { return acc_max(a, b); }
};

template <typename Op, typename A>
__device__ __forceinline__ A group_reduce(A v, int tpr, A* red) {
    for (int o = (tpr < 32 ? tpr : 32) >> 1; o > 0; o >>= 1) v = Op::op(v, shfl_xor(v, o));
    if (tpr <= 32) return v;
    const int warp = threadIdx.x >> 5, wpr = tpr >> 5, first = (warp / wpr) * wpr;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    v = red[first];
    for (int i = 1; i < wpr; ++i) v = Op::op(v, red[first + i]);
    return v;                                  // every thread of the group holds the result
}

template <typename A>
__device__ __forceinline__ void group_max_sum(A& m, A& l, int tpr, A* red_m, A* red_l) {
    for (int o = (tpr < 32 ? tpr : 32) >> 1; o > 0; o >>= 1) online_merge(m, l, shfl_xor(m, o), shfl_xor(l, o));
    if (tpr <= 32) return;
    const int warp = threadIdx.x >> 5, wpr = tpr >> 5, first = (warp / wpr) * wpr;
    if ((threadIdx.x & 31) == 0) { red_m[warp] = m; red_l[warp] = l; }
    __syncthreads();
    m = red_m[first];
    l = red_l[first];
    for (int i = 1; i < wpr; ++i) online_merge(m, l, red_m[first + i], red_l[first + i]);
}

// The row this thread works on and its place in it.
struct RowPos {
    long long row, ih, ig, ir;
    int lane, slot;
    bool valid;
    __device__ __forceinline__ RowPos(int tpr, long long rows, long long ng, long long nr) {
        slot = threadIdx.x / tpr;
        lane = threadIdx.x & (tpr - 1);
        row = (long long)blockIdx.x * (blockDim.x / tpr) + slot;
        valid = row < rows;
        const long long r = valid ? row : 0;
        ir = r % nr;
        const long long t = r / nr;
        ig = t % ng;
        ih = t / ng;
    }
};

// The raw scores of vector `v` (elements j = v*N .. v*N+N-1) of a row, or -inf (not read) when
// the whole vector lies at or beyond n_vis (hidden by the causal rule, or past the row).
template <typename A, int N>
__device__ __forceinline__ void load_scores(A (&e)[N], const A* s_row, int v, int n_vis) {
    if (v * N < n_vis) {
        load_vec(s_row + v * N, e);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) e[i] = neg_inf<A>();
    }
}

// Raw scores of vector `v` -> visible scores: scale, mask/bias, -inf at or beyond n_vis.
template <typename MaskT, typename A, int N>
__device__ __forceinline__ void make_visible(A (&e)[N], int v, int n_vis, A scale, const MaskT* mask,
                                             long long m_base, long long m_sk) {
    const int j0 = v * N;
#pragma unroll
    for (int i = 0; i < N; ++i)
        e[i] = (j0 + i < n_vis) ? MaskOp<MaskT, A>::apply(e[i] * scale, mask, m_base + (long long)(j0 + i) * m_sk)
                                : neg_inf<A>();
}

// The visible scores of vector `v` of a row: -inf beyond n_vis.
template <typename MaskT, typename A, int N>
__device__ __forceinline__ void visible_vec(A (&e)[N], const A* s_row, int v, int n_vis,
                                            A scale, const MaskT* mask, long long m_base, long long m_sk) {
    load_scores<A, N>(e, s_row, v, n_vis);
    make_visible<MaskT, A, N>(e, v, n_vis, scale, mask, m_base, m_sk);
}

// Register rows: raw scores -> visible scores of a thread's VPT vectors (first + i * 32), and
// their maximum. The mask's keys are contiguous (m_sk == 1: the host sends other masks to the
// shared-memory kernel), so that a thread's mask elements lie at fixed offsets from `m_row`.
template <typename MaskT, typename A, int N, int VPT>
__device__ __forceinline__ A visible_regs(A (&e)[VPT][N], int first, int n_vis, A scale, const MaskT* m_row) {
    A mx = neg_inf<A>();
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int j0 = (first + i * 32) * N;
        const int count = n_vis - j0;                 // visible elements of this vector (may be <= 0)
#pragma unroll
        for (int k = 0; k < N; ++k) {
            e[i][k] = (k < count) ? MaskOp<MaskT, A>::apply(e[i][k] * scale, m_row, j0 + k) : neg_inf<A>();
            mx = acc_max(mx, e[i][k]);
        }
    }
    return mx;
}

}  // namespace chunked

template <typename T, typename MaskT, bool RECOMPUTE, int VPT>
// Register rows (VPT > 0, float accumulation): at most 64 registers, so that two blocks of 512
// threads (or four of 256) share an SM.
__global__ void __launch_bounds__(512, (!RECOMPUTE && VPT > 0 && VPT * sizeof(typename chunked::Acc<T>::type) <= 32) ? 2 : 1)
chunk_softmax(
        typename chunked::Acc<T>::type* S, long long n_keys, long long pitch, T* P,
        typename chunked::Acc<T>::type* lse, long long lse_sh, long long lse_sg, long long lse_sr,
        const MaskT* mask, long long m_sh, long long m_sg, long long m_sr, long long m_sk,
        long long rows, long long ng, long long nr, long long causal_offset, int causal,
        typename chunked::Acc<T>::type scale, int tpr, int resident) {
    using namespace chunked;
    typedef typename Acc<T>::type A;
    constexpr int N = Vec<A>::N;
    constexpr int UNROLL = sizeof(A) == 8 ? 1 : 4;   // loads in flight per thread (double: exp is large)
    static_assert(VPT >= 0 && !(RECOMPUTE && VPT > 0), "VPT: register vectors per thread of the forward");
    __shared__ A red_m[32];
    __shared__ A red_l[32];

    const RowPos pos(tpr, rows, ng, nr);
    const A* s_row = S + pos.row * pitch;
    T* p_row = P + pos.row * pitch;
    const long long m_base = pos.ih * m_sh + pos.ig * m_sg + pos.ir * m_sr;
    A* lse_at = lse + (pos.ih * lse_sh + pos.ig * lse_sg + pos.ir * lse_sr);
    // keys j <= last_visible are visible under the causal rule
    const long long last_visible = causal ? pos.ir + causal_offset : n_keys - 1;
    // keys j < n_vis may be visible (0 for the padding rows of the last block: they read nothing
    // and only join reductions)
    const int n_vis = !pos.valid ? 0
        : (int)(last_visible + 1 < n_keys ? (last_visible + 1 < 0 ? 0 : last_visible + 1) : n_keys);
    // vectors of this row (0 for the padding rows)
    const int row_vecs = (int)((n_keys + N - 1) / N);
    const int nv = pos.valid ? row_vecs : 0;

    if constexpr (RECOMPUTE) {
        if (!pos.valid) return;
        const A l = *lse_at;
        const A shift = (l == neg_inf<A>()) ? (A)0 : l;
#pragma unroll UNROLL
        for (int v = pos.lane; v < nv; v += tpr) {
            A e[N];
            visible_vec<MaskT, A, N>(e, s_row, v, n_vis, scale, mask, m_base, m_sk);
#pragma unroll
            for (int i = 0; i < N; ++i) e[i] = acc_exp(e[i] - shift);
            store_vec(p_row + v * N, e);
        }
    } else if constexpr (VPT > 0) {
        // Register rows: the whole row in registers (the host guarantees nv <= VPT * tpr and
        // tpr >= 32). Warp w of the row holds vectors w * 32 * VPT + i * 32 + (lane & 31), i < VPT:
        // each load instruction of a warp reads 512 contiguous bytes, and a thread's vectors lie
        // at fixed offsets from one address. One read of S, two reductions, one write of P.
        if (tpr < 32 || (!IsNoMask<MaskT>::value && m_sk != 1)) __trap();
        const int first = (pos.lane >> 5) * (32 * VPT) + (pos.lane & 31);
        A e[VPT][N];
#pragma unroll
        for (int i = 0; i < VPT; ++i) load_scores<A, N>(e[i], s_row, first + i * 32, n_vis);
        A mx = visible_regs<MaskT, A, N, VPT>(e, first, n_vis, scale, mask + m_base);
        mx = group_reduce<MaxOp>(mx, tpr, red_m);     // never NaN (fmax ignores NaN)
        const A shift = (mx == neg_inf<A>()) ? (A)0 : mx;
        A sum = (A)0;
#pragma unroll
        for (int i = 0; i < VPT; ++i)
#pragma unroll
            for (int k = 0; k < N; ++k) { e[i][k] = acc_exp(e[i][k] - shift); sum += e[i][k]; }   // hidden: 0, NaN stays NaN
        const A row_sum = group_reduce<SumOp>(sum, tpr, red_l);
        const A inv = (A)1 / ((row_sum == (A)0) ? (A)1 : row_sum);
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            const int v = first + i * 32;
            if (v < nv) {
#pragma unroll
                for (int k = 0; k < N; ++k) e[i][k] = e[i][k] * inv;
                store_vec(p_row + v * N, e[i]);
            }
        }
        if (pos.valid && pos.lane == 0) *lse_at = shift + acc_log(row_sum);
    } else {
        A shift, row_sum;
        if (resident) {
            // one read of S: the row's visible scores stay in shared memory
            extern __shared__ __align__(16) unsigned char dyn_smem[];
            A* buf = reinterpret_cast<A*>(dyn_smem) + pos.slot * row_vecs * N;
            A mx = neg_inf<A>();
#pragma unroll UNROLL
            for (int v = pos.lane; v < nv; v += tpr) {
                A e[N];
                visible_vec<MaskT, A, N>(e, s_row, v, n_vis, scale, mask, m_base, m_sk);
#pragma unroll
                for (int i = 0; i < N; ++i) mx = acc_max(mx, e[i]);
                store_vec(buf + v * N, e);
            }
            mx = group_reduce<MaxOp>(mx, tpr, red_m);     // never NaN (fmax ignores NaN)
            shift = (mx == neg_inf<A>()) ? (A)0 : mx;
            A sum = (A)0;
            for (int v = pos.lane; v < nv; v += tpr) {       // the elements this thread wrote
                A e[N];
                load_vec(buf + v * N, e);
#pragma unroll
                for (int i = 0; i < N; ++i) { e[i] = acc_exp(e[i] - shift); sum += e[i]; }   // NaN stays NaN
                store_vec(buf + v * N, e);
            }
            row_sum = group_reduce<SumOp>(sum, tpr, red_l);
            const A inv = (A)1 / ((row_sum == (A)0) ? (A)1 : row_sum);
            for (int v = pos.lane; v < nv; v += tpr) {
                A e[N];
                load_vec(buf + v * N, e);
#pragma unroll
                for (int i = 0; i < N; ++i) e[i] = e[i] * inv;
                store_vec(p_row + v * N, e);
            }
        } else {
            A m = neg_inf<A>(), l = (A)0;
            for (int v = pos.lane; v < nv; v += tpr) {
                A e[N];
                visible_vec<MaskT, A, N>(e, s_row, v, n_vis, scale, mask, m_base, m_sk);
#pragma unroll
                for (int i = 0; i < N; ++i) online_add(m, l, e[i]);
            }
            group_max_sum(m, l, tpr, red_m, red_l);
            shift = (m == neg_inf<A>()) ? (A)0 : m;
            row_sum = l;
            const A inv = (A)1 / ((l == (A)0) ? (A)1 : l);
            for (int v = pos.lane; v < nv; v += tpr) {
                A e[N];
                visible_vec<MaskT, A, N>(e, s_row, v, n_vis, scale, mask, m_base, m_sk);
#pragma unroll
                for (int i = 0; i < N; ++i) e[i] = acc_exp(e[i] - shift) * inv;
                store_vec(p_row + v * N, e);
            }
        }
        if (pos.valid && pos.lane == 0) *lse_at = shift + acc_log(row_sum);
    }
}

template <typename T>
__global__ void __launch_bounds__(512, 1) chunk_dscores(
        T* P, const typename chunked::Acc<T>::type* dP, long long n_keys, long long pitch,
        const T* dO, long long do_sh, long long do_sg, long long do_sr, long long do_sd,
        const T* O, long long o_sh, long long o_sg, long long o_sr, long long o_sd,
        long long dv, long long rows, long long ng, long long nr,
        typename chunked::Acc<T>::type scale, int tpr) {
    using namespace chunked;
    typedef typename Acc<T>::type A;
    constexpr int N = Vec<A>::N;
    constexpr int UNROLL = sizeof(A) == 8 ? 1 : 4;   // loads in flight per thread (double: exp is large)
    __shared__ A red[32];

    const RowPos pos(tpr, rows, ng, nr);
    const T* do_row = dO + pos.ih * do_sh + pos.ig * do_sg + pos.ir * do_sr;
    const T* o_row = O + pos.ih * o_sh + pos.ig * o_sg + pos.ir * o_sr;
    A part = (A)0;
    if (pos.valid)
        for (long long d = pos.lane; d < dv; d += tpr)
            part += (A)to_acc(do_row[d * do_sd]) * (A)to_acc(o_row[d * o_sd]);
    const A delta = group_reduce<SumOp>(part, tpr, red);
    if (!pos.valid) return;

    T* p_row = P + pos.row * pitch;
    const A* dp_row = dP + pos.row * pitch;
    const int nv = (int)((n_keys + N - 1) / N);
#pragma unroll UNROLL
    for (int v = pos.lane; v < nv; v += tpr) {
        A p[N], d[N];
        load_vec(p_row + v * N, p);
        load_vec(dp_row + v * N, d);
#pragma unroll
        for (int i = 0; i < N; ++i) p[i] = p[i] * (d[i] - delta) * scale;
        store_vec(p_row + v * N, p);
    }
}
