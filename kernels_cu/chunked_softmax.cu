// The chunked backend's fused steps between its cuBLAS products (see cupyattn/_chunked.py).
//
// A chunk's scores S are a contiguous (rows, n_keys) block in the accumulation type (float, or
// double for double inputs); row `row` of the chunk is (head ih, group ig, query ir) with
//   row = (ih * ng + ig) * nr + ir.
// Everything else (mask/bias, lse, dO, O) is read in place through element strides for
// (ih, ig, ir[, column]); broadcast axes have stride 0 and are never expanded.
//
// chunk_softmax<T, MaskT, RECOMPUTE>: one block per score row.
//   s = S * scale (+ bias); hidden keys (causal: key j > ir + causal_offset; bool mask false) = -inf
//   forward   (RECOMPUTE=false): online row max/sum, P = exp(s - max) / sum, lse = max + log(sum)
//   recompute (RECOMPUTE=true):  P = exp(s - lse) from the saved lse (backward)
//   Rows with no visible key give P = 0 and lse = -inf; NaN propagates like the eager backend.
//   P is written in T (the input dtype); it may alias S when T is the accumulation type
//   (each element is read and written by the same thread).
// chunk_dscores<T>: one block per row: delta = sum_d dO*O, dS = P * (dP - delta) * scale,
//   written in T over P (same element, same thread).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace chunked {

struct NoMask {};

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T, typename A> __device__ __forceinline__ T store_cast(A x) { return from_acc<T>(x); }
template <> __device__ __forceinline__ double store_cast<double, double>(double x) { return x; }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

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

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
    for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
    __syncthreads();                           // smem may still be read from a previous reduction
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < nwarps ? smem[lane] : (A)0;
    for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
    return v;                                  // every thread holds the sum
}

template <typename A>
__device__ __forceinline__ void block_max_sum(A& m, A& l, A* smem_m, A* smem_l) {
    for (int o = 16; o > 0; o >>= 1) online_merge(m, l, shfl_xor(m, o), shfl_xor(l, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) { smem_m[warp] = m; smem_l[warp] = l; }
    __syncthreads();
    m = lane < nwarps ? smem_m[lane] : neg_inf<A>();
    l = lane < nwarps ? smem_l[lane] : (A)0;
    for (int o = 16; o > 0; o >>= 1) online_merge(m, l, shfl_xor(m, o), shfl_xor(l, o));
}

}  // namespace chunked

// Block size: a multiple of 32, at most 512 (chosen by the host from the row length).
template <typename T, typename MaskT, bool RECOMPUTE>
__global__ void __launch_bounds__(512) chunk_softmax(
        typename chunked::Acc<T>::type* S, long long n_keys, T* P,
        typename chunked::Acc<T>::type* lse, long long lse_sh, long long lse_sg, long long lse_sr,
        const MaskT* mask, long long m_sh, long long m_sg, long long m_sr, long long m_sk,
        long long ng, long long nr, long long causal_offset, int causal,
        typename chunked::Acc<T>::type scale) {
    using namespace chunked;
    typedef typename Acc<T>::type A;
    __shared__ A smem_m[32];
    __shared__ A smem_l[32];

    const long long row = blockIdx.x;
    const long long ir = row % nr;
    const long long t = row / nr;
    const long long ig = t % ng;
    const long long ih = t / ng;
    A* s_row = S + row * n_keys;
    T* p_row = P + row * n_keys;
    const long long m_base = ih * m_sh + ig * m_sg + ir * m_sr;
    const long long lse_off = ih * lse_sh + ig * lse_sg + ir * lse_sr;
    // keys j <= last_visible are visible under the causal rule
    const long long last_visible = causal ? ir + causal_offset : n_keys - 1;
    const long long n_vis = last_visible + 1 < n_keys ? (last_visible + 1 < 0 ? 0 : last_visible + 1) : n_keys;

    if (RECOMPUTE) {
        A l = lse[lse_off];
        const A shift = (l == neg_inf<A>()) ? (A)0 : l;
        for (long long j = threadIdx.x; j < n_keys; j += blockDim.x) {
            A s = neg_inf<A>();
            if (j < n_vis) s = MaskOp<MaskT, A>::apply(s_row[j] * scale, mask, m_base + j * m_sk);
            p_row[j] = store_cast<T, A>(acc_exp(s - shift));
        }
        return;
    }

    A m = neg_inf<A>(), l = (A)0;
    for (long long j = threadIdx.x; j < n_keys; j += blockDim.x) {
        A s = neg_inf<A>();
        if (j < n_vis) s = MaskOp<MaskT, A>::apply(s_row[j] * scale, mask, m_base + j * m_sk);
        s_row[j] = s;                          // the second pass reads the visible score
        online_add(m, l, s);
    }
    block_max_sum(m, l, smem_m, smem_l);
    const A shift = (m == neg_inf<A>()) ? (A)0 : m;
    const A denom = (l == (A)0) ? (A)1 : l;
    if (threadIdx.x == 0) lse[lse_off] = shift + acc_log(l);
    for (long long j = threadIdx.x; j < n_keys; j += blockDim.x) {
        const A s = s_row[j];
        p_row[j] = store_cast<T, A>(acc_exp(s - shift) / denom);
    }
}

template <typename T>
__global__ void __launch_bounds__(512) chunk_dscores(
        T* P, const typename chunked::Acc<T>::type* dP, long long n_keys,
        const T* dO, long long do_sh, long long do_sg, long long do_sr, long long do_sd,
        const T* O, long long o_sh, long long o_sg, long long o_sr, long long o_sd,
        long long dv, long long ng, long long nr, typename chunked::Acc<T>::type scale) {
    using namespace chunked;
    typedef typename Acc<T>::type A;
    __shared__ A smem[32];

    const long long row = blockIdx.x;
    const long long ir = row % nr;
    const long long t = row / nr;
    const long long ig = t % ng;
    const long long ih = t / ng;
    const T* do_row = dO + ih * do_sh + ig * do_sg + ir * do_sr;
    const T* o_row = O + ih * o_sh + ig * o_sg + ir * o_sr;
    A part = (A)0;
    for (long long d = threadIdx.x; d < dv; d += blockDim.x)
        part += (A)to_acc(do_row[d * do_sd]) * (A)to_acc(o_row[d * o_sd]);
    const A delta = block_sum(part, smem);

    T* p_row = P + row * n_keys;
    const A* dp_row = dP + row * n_keys;
    for (long long j = threadIdx.x; j < n_keys; j += blockDim.x) {
        const A p = (A)to_acc(p_row[j]);
        p_row[j] = store_cast<T, A>(p * (dp_row[j] - delta) * scale);
    }
}
