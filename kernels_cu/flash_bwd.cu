// Flash attention backward (sm_80+): recomputes S = Q K^T and P = exp(S - lse) tile by tile from the
// forward's lse, never storing the Lq x Lk probabilities. mma.sync m16n8k16, fp32 accumulate.
//
// Three kernels:
//   flash_bwd_prep_kernel   delta[row] = rowsum(dO * O) (fp32) and lse2 = lse * log2(e) with
//                           lse = -inf (a row that sees no key) turned into +inf, so that
//                           exp2(x - lse2) = 0 there without a NaN.
//   flash_bwd_kernel        one block per (batch, kv head, BLOCK_N keys). dK and dV for its keys stay
//                           in registers while it loops over the G query heads of the group (GQA/MQA:
//                           no repeated K/V, no atomics for dK/dV) and over the query tiles that can
//                           see its keys (causal: tiles entirely above the diagonal are skipped).
//                           Per tile:  S^T = K Q^T, P^T = exp2(S^T*scale*log2e - lse2),
//                           dP^T = V dO^T, dS^T = P^T o (dP^T - delta), dV += P^T dO, dK += dS^T Q,
//                           and (atomic mode) dQ += dS K with fp32 atomicAdd into dq_accum.
//   flash_bwd_dq_kernel     deterministic dQ: one block per (batch, query head, BLOCK_M queries),
//                           looping over key tiles in a fixed order, recomputing S, P, dP, dS and
//                           accumulating dQ = dS K in registers (no atomics; same bits every run).
//
// The default (deterministic=False) is the atomic dQ: dQ costs one extra mma per tile inside the
// main kernel, while the deterministic mode recomputes S and dP a second time in another kernel
// (about 7 instead of 5 matrix products per tile, ~1.4x the backward's work). Float atomics make
// the summation order, hence the last bits of dQ, vary from run to run; dK and dV are
// deterministic in both modes.
//
// Warp layout of flash_bwd_kernel (WN = BLOCK_N / KW warps along keys, WQ = NWARPS / WN):
//   phase A  warp (wn, wq) computes S^T / dP^T for keys wn*KW..+KW (KW/16 m-tiles sharing every
//            Q / dO fragment) and queries wq*MQ..+MQ; P^T is rounded to T once, right after the
//            exponential, and that packed P is used for dV and for dS = P o (dP - delta) (so the
//            fp32 S registers are free while dP^T accumulates)
//   phase B  warp (wn, wq) accumulates dK / dV for keys wn*KW..+KW, head-dim columns wq*DW..+DW;
//            with WQ == 1 the P^T and dS^T operands come straight from registers, otherwise
//            through shared memory
//   phase C  warp (wm, wd) computes dQ for queries wm*CW..+CW (CW/16 m-tiles sharing every K
//            fragment), columns wd*DQW..+DQW from dS^T in shared memory, in chunks of at most 32
//            accumulators per thread; on sm_90 the atomics are 16-byte red.global.add.v4.f32
//
// Conventions as flash_fwd.cu: two collapsed batch levels with int64 strides (b0, b1), head and
// row strides for q/k/v and the mask, contiguous last axis; columns past D / Dv are zero-filled in
// shared memory; grid in x only. dout, lse2, delta, dq and dk/dv are contiguous row-major
// (rows = (batch, head, position)).
#include "common.cuh"

using namespace cupyattn;

namespace {

// 4-byte cp.async (L1-allocating form; .cg only takes 16 bytes); zero-fills when src_bytes = 0.
__device__ __forceinline__ void cp_async_4(unsigned dst_smem, const void* src_gmem, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(dst_smem), "l"(src_gmem), "r"(src_bytes) : "memory");
}

// Two packed T from the fp32 C fragment pair (c[lo], c[lo + 1]).
template <typename T>
__device__ __forceinline__ void c_to_a(unsigned* a, const float* c0, const float* c1) {
    // C fragments of two adjacent n8 tiles form the A fragment of one k16 step:
    // a0 (g, 2t..) = c0[0,1], a1 (g+8, 2t..) = c0[2,3], a2 (g, 2t+8..) = c1[0,1], a3 = c1[2,3]
    a[0] = pack2<T>(c0[0], c0[1]);
    a[1] = pack2<T>(c0[2], c0[3]);
    a[2] = pack2<T>(c1[0], c1[1]);
    a[3] = pack2<T>(c1[2], c1[3]);
}

// Packed pair of T (as pack2 writes it) back to two floats: .x the low half, .y the high half.
template <typename T> __device__ __forceinline__ float2 unpack2(unsigned u);
template <> __device__ __forceinline__ float2 unpack2<__half>(unsigned u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// delta = rowsum(dO * O), lse2 = lse * log2(e) (+inf where lse = -inf); one warp per row.
template <typename T>
__global__ void __launch_bounds__(256)
flash_bwd_prep_kernel(const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ lse,
                      float* __restrict__ delta, float* __restrict__ lse2, long long rows, int Dv,
                      int Lq, int pitch) {
    // delta / lse2 rows of Lq entries start every `pitch` entries (pitch = Lq: contiguous; the
    // Hopper main kernel wants whole 64-row tiles, 16-byte aligned, for its bulk copies)
    const long long row = static_cast<long long>(blockIdx.x) * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* a = dout + row * Dv;
    const T* b = out + row * Dv;
    float acc = 0.f;
    for (int c = lane; c < Dv; c += 32) acc += to_float(a[c]) * to_float(b[c]);
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) {
        const long long at = (row / Lq) * pitch + row % Lq;
        delta[at] = acc;
        const float l = lse[row];
        lse2[at] = l == -INFINITY ? INFINITY : l * kLog2e;
    }
}

// n-tiles per phase-C chunk: all NDQ when CM * NDQ * 4 accumulators fit in 32 registers, else the
// largest even divisor of NDQ that does.
__host__ __device__ constexpr int bwd_dq_chunk(int ndq, int cm) {
    if (cm * ndq * 4 <= 32) return ndq;
    for (int c = 8 / cm; c >= 2; c -= 2)
        if (c % 2 == 0 && ndq % c == 0) return c;
    return 2;
}

// ---------------------------------------------------------------------------------------------
// dQ += scale * acc for one 16-row C tile pair (rows qrow, qrow + 8; columns col .. col + 1 per
// thread), fp32 atomics. On sm_90 with D % 4 == 0, the quad's lanes t4 and t4 ^ 1 swap half their
// fragment so that each lane owns 4 consecutive columns of one row: one 16-byte
// red.global.add.v4.f32 per lane and n-tile instead of four scalar atomics. Must be called by the
// whole warp (shuffles); D is uniform across it.
__device__ __forceinline__ void bwd_dq_atomic(float* __restrict__ dq_rows, const float* c, int qrow, int col,
                                              int Lq, int D, float scale, int t4) {
#if __CUDA_ARCH__ >= 900
    if ((D & 3) == 0) {
        const bool odd = t4 & 1;
        // even lane keeps row g (c[0], c[1]) and receives its partner's row-g pair;
        // odd lane keeps row g + 8 (c[2], c[3]) and receives its partner's row-(g+8) pair
        float x = odd ? c[0] : c[2];
        float y = odd ? c[1] : c[3];
        x = __shfl_xor_sync(0xffffffffu, x, 1);
        y = __shfl_xor_sync(0xffffffffu, y, 1);
        const int qi = qrow + (odd ? 8 : 0);
        const int c4 = col - 2 * (t4 & 1);        // col = base + 2 * t4: the quad pair's first column
        float v0, v1, v2, v3;
        if (odd) { v0 = x; v1 = y; v2 = c[2]; v3 = c[3]; }
        else     { v0 = c[0]; v1 = c[1]; v2 = x; v3 = y; }
        if (qi < Lq && c4 < D) {
            float* dst = dq_rows + static_cast<long long>(qi) * D + c4;
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n"
                         :: "l"(dst), "f"(v0 * scale), "f"(v1 * scale), "f"(v2 * scale), "f"(v3 * scale)
                         : "memory");
        }
        return;
    }
#endif
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = qrow + 8 * r;
        if (qi < Lq) {
            float* dst = dq_rows + static_cast<long long>(qi) * D;
            if (col < D) atomicAdd(dst + col, c[2 * r] * scale);
            if (col + 1 < D) atomicAdd(dst + col + 1, c[2 * r + 1] * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Main backward kernel: dK, dV (and dQ by atomics when atomic_dq != 0).
//   T          __half or __nv_bfloat16
//   HD         padded head dim (multiple of 32, <= 256); real D, Dv <= HD are runtime values
//   BLOCK_M    query rows per inner tile;  BLOCK_N keys per block
//   KW         keys per warp in phases A and B (16 or 32: KW / 16 m-tiles share every B fragment)
//   CW         query rows per warp in phase C (16 or 32: CW / 16 m-tiles share every K fragment)
//   STAGES     1 or 2 shared-memory buffers for the Q / dO tiles
//   MASKED     a boolean mask (mask_kind 1) or additive bias (mask_kind 2) is read in place
template <typename T, int HD, int BLOCK_M, int BLOCK_N, int NWARPS, int KW, int CW, int STAGES, bool MASKED>
__global__ void __launch_bounds__(NWARPS * 32, 1)
flash_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const void* __restrict__ mask, const T* __restrict__ dout,
                 const float* __restrict__ lse2, const float* __restrict__ delta,
                 float* __restrict__ dq_accum, float* __restrict__ dk_out, float* __restrict__ dv_out,
                 int Lq, int Lk, int D, int Dv, int Hq, int group, int nb_inner, int num_n_blocks,
                 int causal, int mask_kind, int bias_dtype, int vec_flags, int atomic_dq,
                 float scale_log2, float scale,
                 long long q_b0, long long q_b1, long long q_h, long long q_l,
                 long long k_b0, long long k_b1, long long k_h, long long k_l,
                 long long v_b0, long long v_b1, long long v_h, long long v_l,
                 long long m_b0, long long m_b1, long long m_h, long long m_q, long long m_k) {
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = HD + 8;              // K, V, Q, dO row pitch (elements)
    constexpr int LDP = BLOCK_M + 8;         // P^T, dS^T row pitch
    constexpr int KM = KW / 16;              // 16-key m-tiles per warp, phases A and B
    constexpr int WN = BLOCK_N / KW;         // warps along keys
    constexpr int WQ = NWARPS / WN;          // warps along queries (phase A) / head dim (phase B)
    constexpr int MQ = BLOCK_M / WQ;         // query columns per warp, phase A
    constexpr int NSQ = MQ / 8;
    constexpr int DW = HD / WQ;              // head-dim columns per warp, phase B
    constexpr int NDW = DW / 8;
    constexpr int CM = CW / 16;              // 16-query m-tiles per warp, phase C
    constexpr int WMQ = BLOCK_M / CW;        // warps along queries, phase C
    constexpr int WDQ = NWARPS / WMQ;
    constexpr int DQW = HD / WDQ;            // head-dim columns per warp, phase C
    constexpr int NDQ = DQW / 8;
    constexpr int NDQC = bwd_dq_chunk(NDQ, CM);   // n-tiles per phase-C chunk
    constexpr int KSTEPS = HD / 16;
    static_assert(HD % 32 == 0 && HD <= 256, "padded head dim");
    static_assert(NDQC % 2 == 0 && NDQ % NDQC == 0, "phase C chunks");
    static_assert(KW % 16 == 0 && BLOCK_N % KW == 0 && NWARPS % WN == 0 && WN * WQ == NWARPS, "warps along keys");
    static_assert(MQ % 16 == 0 && MQ * WQ == BLOCK_M, "phase A query split");
    static_assert(DW % 16 == 0 && DW * WQ == HD, "phase B column split");
    static_assert(CW % 16 == 0 && BLOCK_M % CW == 0 && NWARPS % WMQ == 0 && DQW % 16 == 0 && DQW * WDQ == HD,
                  "phase C split");
    static_assert(STAGES == 1 || STAGES == 2, "stages");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BLOCK_N * LDS;
    T* sQ = sV + BLOCK_N * LDS;                         // STAGES x BLOCK_M x LDS
    T* sdO = sQ + STAGES * BLOCK_M * LDS;               // STAGES x BLOCK_M x LDS
    T* sdS = sdO + STAGES * BLOCK_M * LDS;              // BLOCK_N x LDP (dS^T: [key][query])
    T* sP = sdS + BLOCK_N * LDP;                        // BLOCK_N x LDP (P^T), only when WQ > 1
    float* sL = reinterpret_cast<float*>(sP + (WQ > 1 ? BLOCK_N * LDP : 0));   // STAGES x BLOCK_M
    float* sD = sL + STAGES * BLOCK_M;                                          // STAGES x BLOCK_M

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    // ---- block -> (batch, kv head, key tile) ----------------------------------------------------
    long long bid = blockIdx.x;
    const int nb = static_cast<int>(bid % num_n_blocks);   // causal: low key tiles (most queries) first
    bid /= num_n_blocks;
    const int Hkv = Hq / group;
    const int hkv = static_cast<int>(bid % Hkv);
    const long long bflat = bid / Hkv;
    const int b1 = static_cast<int>(bflat % nb_inner);
    const long long b0 = bflat / nb_inner;
    const int n0 = nb * BLOCK_N;
    const int off = Lk - Lq;                   // key j visible to query i iff j <= i + off (causal)

    const int num_m = (Lq + BLOCK_M - 1) / BLOCK_M;
    const int m_begin = causal ? max(0, n0 - off) / BLOCK_M : 0;
    const int n_m = max(0, num_m - m_begin);
    const int n_iter = group * n_m;            // (query head of the group, query tile) pairs

    const bool vec_q = vec_flags & 1, vec_k = vec_flags & 2, vec_v = vec_flags & 4, vec_do = vec_flags & 8;
    const T* q_bb = q + b0 * q_b0 + b1 * q_b1;

    auto issue = [&](int it, int st) {
        const int hq = hkv * group + it / n_m;
        const int m0 = (m_begin + it % n_m) * BLOCK_M;
        const T* qg = q_bb + hq * q_h + static_cast<long long>(m0) * q_l;
        load_tile<T, BLOCK_M, HD, NT>(sQ + st * BLOCK_M * LDS, qg, q_l, Lq - m0, D, vec_q, tid, q);
        const long long row0 = (bflat * Hq + hq) * Lq + m0;
        load_tile<T, BLOCK_M, HD, NT>(sdO + st * BLOCK_M * LDS, dout + row0 * Dv, Dv, Lq - m0, Dv,
                                          vec_do, tid, dout);
        if (tid < BLOCK_M) {
            const bool ok = m0 + tid < Lq;
            cp_async_4(smem_u32(sL + st * BLOCK_M + tid), ok ? lse2 + row0 + tid : lse2, ok ? 4 : 0);
        } else if (tid < 2 * BLOCK_M) {
            const int r = tid - BLOCK_M;
            const bool ok = m0 + r < Lq;
            cp_async_4(smem_u32(sD + st * BLOCK_M + r), ok ? delta + row0 + r : delta, ok ? 4 : 0);
        }
    };
    static_assert(2 * BLOCK_M <= NT, "lse/delta loads");

    // ---- prologue: K, V and the first Q / dO tile -------------------------------------------------
    {
        const T* kg = k + b0 * k_b0 + b1 * k_b1 + hkv * k_h + static_cast<long long>(n0) * k_l;
        const T* vg = v + b0 * v_b0 + b1 * v_b1 + hkv * v_h + static_cast<long long>(n0) * v_l;
        load_tile<T, BLOCK_N, HD, NT>(sK, kg, k_l, Lk - n0, D, vec_k, tid, k);
        load_tile<T, BLOCK_N, HD, NT>(sV, vg, v_l, Lk - n0, Dv, vec_v, tid, v);
        if (n_iter > 0) issue(0, 0);
    }
    cp_async_commit();

    const int wn = warp % WN, wq = warp / WN;
    const int key_row0 = wn * KW;              // this warp's keys (local), phases A and B
    const int q_col0 = wq * MQ;                // this warp's query columns (local), phase A
    const int wm = warp % WMQ, wd = warp / WMQ;   // phase C

    float dk[KM][NDW][4], dv[KM][NDW][4];
#pragma unroll
    for (int km = 0; km < KM; ++km) {
#pragma unroll
        for (int i = 0; i < NDW; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) { dk[km][i][e] = 0.f; dv[km][i][e] = 0.f; }
        }
    }

    for (int it = 0; it < n_iter; ++it) {
        const int st = STAGES == 2 ? (it & 1) : 0;
        if (STAGES == 2) {
            cp_async_wait<0>();
            __syncthreads();   // tile `it` visible; every warp is done with iteration it-1
            if (it + 1 < n_iter) issue(it + 1, (it + 1) & 1);
            cp_async_commit();
        } else {
            if (it > 0) {
                __syncthreads();   // every warp is done with iteration it-1's Q / dO / dS
                issue(it, 0);
                cp_async_commit();
            }
            cp_async_wait<0>();
            __syncthreads();
        }
        const int hq = hkv * group + it / n_m;
        const int m0 = (m_begin + it % n_m) * BLOCK_M;
        const T* sQs = sQ + st * BLOCK_M * LDS;
        const T* sdOs = sdO + st * BLOCK_M * LDS;
        const float* sLs = sL + st * BLOCK_M;
        const float* sDs = sD + st * BLOCK_M;

        // ---- phase A: S^T = K Q^T (each Q fragment feeds KM m-tiles) -------------------------------
        float s[KM][NSQ][4];
#pragma unroll
        for (int km = 0; km < KM; ++km) {
#pragma unroll
            for (int i = 0; i < NSQ; ++i) s[km][i][0] = s[km][i][1] = s[km][i][2] = s[km][i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[KM][4];
#pragma unroll
            for (int km = 0; km < KM; ++km)
                ldmatrix_x4(a[km][0], a[km][1], a[km][2], a[km][3],
                            smem_u32(sK + (key_row0 + km * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int jp = 0; jp < NSQ / 2; ++jp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4(b0r, b1r, b2r, b3r,
                            smem_u32(sQs + (q_col0 + jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16
                                     + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int km = 0; km < KM; ++km) {
                    mma_16816<T>(s[km][2 * jp], a[km], b0r, b1r);
                    mma_16816<T>(s[km][2 * jp + 1], a[km], b2r, b3r);
                }
            }
        }

        // P^T = exp2(S^T * scale * log2e (+ bias * log2e) - lse2[query]), hidden entries 0
        unsigned pp[KM][NSQ][2];   // P^T as packed T pairs (rows g, g + 8 of each C tile)
        const bool full = !MASKED && n0 + BLOCK_N <= Lk && m0 + BLOCK_M <= Lq
                          && (!causal || n0 + BLOCK_N - 1 <= m0 + off);
        long long mbase = 0;
        if (MASKED) mbase = b0 * m_b0 + b1 * m_b1 + hq * m_h;
#pragma unroll
        for (int i = 0; i < NSQ; ++i) {
            const int qc = q_col0 + i * 8 + 2 * t4;
            const float2 l2 = *reinterpret_cast<const float2*>(sLs + qc);
#pragma unroll
            for (int km = 0; km < KM; ++km) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[km][i][e] * scale_log2;
                    bool vis = true;
                    if (!full) {
                        const int key = n0 + key_row0 + km * 16 + g + 8 * (e >> 1);
                        const int qi = m0 + qc + (e & 1);
                        vis = key < Lk && qi < Lq;
                        if (causal) vis = vis && key <= qi + off;
                        if (MASKED && vis) {
                            const long long mo = mbase + static_cast<long long>(qi) * m_q
                                                 + static_cast<long long>(key) * m_k;
                            if (mask_kind == 1) vis = static_cast<const unsigned char*>(mask)[mo] != 0;
                            else x += load_bias(mask, mo, bias_dtype) * kLog2e;
                        }
                    }
                    s[km][i][e] = vis ? fast_exp2(x - ((e & 1) ? l2.y : l2.x)) : 0.f;
                }
                // P^T rounded to T once: the packed pairs are the A operand of dV += P^T dO (from
                // registers or, for the other warps, from sP) and the P in dS = P o (dP - delta), so
                // the fp32 S registers are free before dP^T is accumulated.
#pragma unroll
                for (int r = 0; r < 2; ++r) pp[km][i][r] = pack2<T>(s[km][i][2 * r], s[km][i][2 * r + 1]);
            }
        }

        // dP^T = V dO^T
        float dp[KM][NSQ][4];
#pragma unroll
        for (int km = 0; km < KM; ++km) {
#pragma unroll
            for (int i = 0; i < NSQ; ++i) dp[km][i][0] = dp[km][i][1] = dp[km][i][2] = dp[km][i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[KM][4];
#pragma unroll
            for (int km = 0; km < KM; ++km)
                ldmatrix_x4(a[km][0], a[km][1], a[km][2], a[km][3],
                            smem_u32(sV + (key_row0 + km * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int jp = 0; jp < NSQ / 2; ++jp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4(b0r, b1r, b2r, b3r,
                            smem_u32(sdOs + (q_col0 + jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16
                                     + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int km = 0; km < KM; ++km) {
                    mma_16816<T>(dp[km][2 * jp], a[km], b0r, b1r);
                    mma_16816<T>(dp[km][2 * jp + 1], a[km], b2r, b3r);
                }
            }
        }

        // dS^T = P^T o (dP^T - delta[query]); store dS^T (and P^T when other warps need it)
#pragma unroll
        for (int i = 0; i < NSQ; ++i) {
            const int qc = q_col0 + i * 8 + 2 * t4;
            const float2 dl = *reinterpret_cast<const float2*>(sDs + qc);
#pragma unroll
            for (int km = 0; km < KM; ++km) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float2 p = unpack2<T>(pp[km][i][r]);
                    dp[km][i][2 * r] = p.x * (dp[km][i][2 * r] - dl.x);
                    dp[km][i][2 * r + 1] = p.y * (dp[km][i][2 * r + 1] - dl.y);
                    const int row = key_row0 + km * 16 + g + 8 * r;
                    *reinterpret_cast<unsigned*>(sdS + row * LDP + qc) =
                        pack2<T>(dp[km][i][2 * r], dp[km][i][2 * r + 1]);
                    if constexpr (WQ > 1) *reinterpret_cast<unsigned*>(sP + row * LDP + qc) = pp[km][i][r];
                }
            }
        }

        // ---- phase B: dV += P^T dO, dK += dS^T Q (each dO / Q fragment feeds KM m-tiles) ------------
        if constexpr (WQ == 1) {
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
                unsigned pa[KM][4], da[KM][4];
#pragma unroll
                for (int km = 0; km < KM; ++km) {
                    // C tiles 2kk, 2kk+1 (queries kk*16 .. +16) form the A fragment of one k16 step
                    pa[km][0] = pp[km][2 * kk][0];
                    pa[km][1] = pp[km][2 * kk][1];
                    pa[km][2] = pp[km][2 * kk + 1][0];
                    pa[km][3] = pp[km][2 * kk + 1][1];
                    c_to_a<T>(da[km], dp[km][2 * kk], dp[km][2 * kk + 1]);
                }
#pragma unroll
                for (int dd = 0; dd < NDW / 2; ++dd) {
                    unsigned b0r, b1r, b2r, b3r;
                    ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                      smem_u32(sdOs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                               + dd * 16 + (lane >> 4) * 8));
#pragma unroll
                    for (int km = 0; km < KM; ++km) {
                        mma_16816<T>(dv[km][2 * dd], pa[km], b0r, b1r);
                        mma_16816<T>(dv[km][2 * dd + 1], pa[km], b2r, b3r);
                    }
                    ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                      smem_u32(sQs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                               + dd * 16 + (lane >> 4) * 8));
#pragma unroll
                    for (int km = 0; km < KM; ++km) {
                        mma_16816<T>(dk[km][2 * dd], da[km], b0r, b1r);
                        mma_16816<T>(dk[km][2 * dd + 1], da[km], b2r, b3r);
                    }
                }
            }
            __syncthreads();   // dS^T complete in shared memory
        } else {
            __syncthreads();   // P^T and dS^T complete in shared memory
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
                unsigned pa[KM][4], da[KM][4];
#pragma unroll
                for (int km = 0; km < KM; ++km) {
                    ldmatrix_x4(pa[km][0], pa[km][1], pa[km][2], pa[km][3],
                                smem_u32(sP + (key_row0 + km * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8));
                    ldmatrix_x4(da[km][0], da[km][1], da[km][2], da[km][3],
                                smem_u32(sdS + (key_row0 + km * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8));
                }
#pragma unroll
                for (int dd = 0; dd < NDW / 2; ++dd) {
                    unsigned b0r, b1r, b2r, b3r;
                    ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                      smem_u32(sdOs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                               + wq * DW + dd * 16 + (lane >> 4) * 8));
#pragma unroll
                    for (int km = 0; km < KM; ++km) {
                        mma_16816<T>(dv[km][2 * dd], pa[km], b0r, b1r);
                        mma_16816<T>(dv[km][2 * dd + 1], pa[km], b2r, b3r);
                    }
                    ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                      smem_u32(sQs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                               + wq * DW + dd * 16 + (lane >> 4) * 8));
#pragma unroll
                    for (int km = 0; km < KM; ++km) {
                        mma_16816<T>(dk[km][2 * dd], da[km], b0r, b1r);
                        mma_16816<T>(dk[km][2 * dd + 1], da[km], b2r, b3r);
                    }
                }
            }
        }

        // ---- phase C: dQ[m0 + wm*CW .., wd*DQW ..] += dS K, fp32 atomics -------------------------
        // The warp's DQW columns go in chunks of NDQC n-tiles so that at most 32 dq accumulators per
        // thread are live next to dK / dV (dS fragments are reloaded per chunk).
        if (atomic_dq) {
            float* dq_rows = dq_accum + (bflat * Hq + hq) * Lq * D;
#pragma unroll
            for (int c0 = 0; c0 < NDQ; c0 += NDQC) {
                float dq[CM][NDQC][4];
#pragma unroll
                for (int cm = 0; cm < CM; ++cm) {
#pragma unroll
                    for (int i = 0; i < NDQC; ++i) dq[cm][i][0] = dq[cm][i][1] = dq[cm][i][2] = dq[cm][i][3] = 0.f;
                }
#pragma unroll
                for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                    unsigned a[CM][4];   // A = dS (rows: queries, k: keys) from dS^T stored [key][query]
#pragma unroll
                    for (int cm = 0; cm < CM; ++cm)
                        ldmatrix_x4_trans(a[cm][0], a[cm][1], a[cm][2], a[cm][3],
                                          smem_u32(sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDP + wm * CW
                                                   + cm * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                    for (int dd = 0; dd < NDQC / 2; ++dd) {
                        unsigned b0r, b1r, b2r, b3r;
                        ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                          smem_u32(sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                                   + wd * DQW + (c0 + 2 * dd) * 8 + (lane >> 4) * 8));
#pragma unroll
                        for (int cm = 0; cm < CM; ++cm) {
                            mma_16816<T>(dq[cm][2 * dd], a[cm], b0r, b1r);
                            mma_16816<T>(dq[cm][2 * dd + 1], a[cm], b2r, b3r);
                        }
                    }
                }
#pragma unroll
                for (int cm = 0; cm < CM; ++cm) {
#pragma unroll
                    for (int i = 0; i < NDQC; ++i)
                        bwd_dq_atomic(dq_rows, dq[cm][i], m0 + wm * CW + cm * 16 + g,
                                      wd * DQW + (c0 + i) * 8 + 2 * t4, Lq, D, scale, t4);
                }
            }
        }
        // the next iteration's first __syncthreads protects sdS / sP / the Q-dO stage from reuse
    }
    cp_async_wait<0>();

    // ---- epilogue: dK (times scale) and dV for this block's keys, fp32 ----------------------------
    const long long kvrow = (bflat * Hkv + hkv) * Lk;
#pragma unroll
    for (int km = 0; km < KM; ++km) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = n0 + key_row0 + km * 16 + g + 8 * r;
            if (key >= Lk) continue;
            float* dkr = dk_out + (kvrow + key) * D;
            float* dvr = dv_out + (kvrow + key) * Dv;
#pragma unroll
            for (int i = 0; i < NDW; ++i) {
                const int col = wq * DW + i * 8 + 2 * t4;
                if ((D & 1) == 0) {
                    if (col < D)
                        *reinterpret_cast<float2*>(dkr + col) =
                            make_float2(dk[km][i][2 * r] * scale, dk[km][i][2 * r + 1] * scale);
                } else {
                    if (col < D) dkr[col] = dk[km][i][2 * r] * scale;
                    if (col + 1 < D) dkr[col + 1] = dk[km][i][2 * r + 1] * scale;
                }
                if ((Dv & 1) == 0) {
                    if (col < Dv) *reinterpret_cast<float2*>(dvr + col) = make_float2(dv[km][i][2 * r], dv[km][i][2 * r + 1]);
                } else {
                    if (col < Dv) dvr[col] = dv[km][i][2 * r];
                    if (col + 1 < Dv) dvr[col + 1] = dv[km][i][2 * r + 1];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one block per (batch, query head, BLOCK_M queries), 16 query rows per warp,
// key tiles streamed through a 2-stage cp.async ring in a fixed order; dQ = scale * sum_j dS_j K_j.
template <typename T, int HD, int BLOCK_M, int BLOCK_N, int NWARPS, bool MASKED>
__global__ void __launch_bounds__(NWARPS * 32, 1)
flash_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const void* __restrict__ mask, const T* __restrict__ dout,
                    const float* __restrict__ lse2, const float* __restrict__ delta,
                    float* __restrict__ dq_out,
                    int Lq, int Lk, int D, int Dv, int Hq, int group, int nb_inner, int num_m_blocks,
                    int causal, int mask_kind, int bias_dtype, int vec_flags,
                    float scale_log2, float scale,
                    long long q_b0, long long q_b1, long long q_h, long long q_l,
                    long long k_b0, long long k_b1, long long k_h, long long k_l,
                    long long v_b0, long long v_b1, long long v_h, long long v_l,
                    long long m_b0, long long m_b1, long long m_h, long long m_q, long long m_k) {
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = HD + 8;
    constexpr int KSTEPS = HD / 16;
    constexpr int NS = BLOCK_N / 8;
    constexpr int NO = HD / 8;
    static_assert(BLOCK_M == 16 * NWARPS, "one warp per 16 query rows");
    static_assert(HD % 32 == 0 && HD <= 256 && BLOCK_N % 16 == 0, "tiles");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + BLOCK_M * LDS;
    T* sK = sdO + BLOCK_M * LDS;              // 2 stages
    T* sV = sK + 2 * BLOCK_N * LDS;           // 2 stages

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    long long bid = blockIdx.x;
    const int mb = num_m_blocks - 1 - static_cast<int>(bid % num_m_blocks);   // heavy causal blocks first
    bid /= num_m_blocks;
    const int hq = static_cast<int>(bid % Hq);
    const long long bflat = bid / Hq;
    const int b1 = static_cast<int>(bflat % nb_inner);
    const long long b0 = bflat / nb_inner;
    const int hkv = hq / group;
    const int m0 = mb * BLOCK_M;
    const int off = Lk - Lq;

    int k_end = Lk;
    if (causal) k_end = min(Lk, min(m0 + BLOCK_M, Lq) - 1 + 1 + off);
    const int n_tiles = k_end > 0 ? (k_end + BLOCK_N - 1) / BLOCK_N : 0;

    const bool vec_q = vec_flags & 1, vec_k = vec_flags & 2, vec_v = vec_flags & 4, vec_do = vec_flags & 8;
    const T* k_base = k + b0 * k_b0 + b1 * k_b1 + hkv * k_h;
    const T* v_base = v + b0 * v_b0 + b1 * v_b1 + hkv * v_h;
    const long long rowbase = (bflat * Hq + hq) * Lq;

    if (n_tiles > 0) {
        load_tile<T, BLOCK_M, HD, NT>(sQ, q + b0 * q_b0 + b1 * q_b1 + hq * q_h + static_cast<long long>(m0) * q_l,
                                          q_l, Lq - m0, D, vec_q, tid, q);
        load_tile<T, BLOCK_M, HD, NT>(sdO, dout + (rowbase + m0) * Dv, Dv, Lq - m0, Dv, vec_do, tid, dout);
        load_tile<T, BLOCK_N, HD, NT>(sK, k_base, k_l, k_end, D, vec_k, tid, k);
        load_tile<T, BLOCK_N, HD, NT>(sV, v_base, v_l, k_end, Dv, vec_v, tid, v);
    }
    cp_async_commit();

    // this thread's rows g and g+8 of the warp's 16
    const int wrow0 = m0 + warp * 16;
    int qi[2];
    bool row_ok[2];
    float l2[2], dl[2];
    long long mrow[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        qi[r] = wrow0 + g + 8 * r;
        row_ok[r] = qi[r] < Lq;
        l2[r] = row_ok[r] ? lse2[rowbase + qi[r]] : INFINITY;
        dl[r] = row_ok[r] ? delta[rowbase + qi[r]] : 0.f;
        if (MASKED) mrow[r] = b0 * m_b0 + b1 * m_b1 + hq * m_h + static_cast<long long>(qi[r]) * m_q;
    }
    int wk_end = k_end;                                   // keys past this are hidden from the whole warp
    if (causal) wk_end = min(k_end, min(wrow0 + 15, Lq - 1) + 1 + off);

    float dq[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<0>();
        __syncthreads();   // tile j visible; every warp is done with tile j-1's stage
        if (j + 1 < n_tiles) {
            const int n1 = (j + 1) * BLOCK_N;
            const int st = (j + 1) & 1;
            load_tile<T, BLOCK_N, HD, NT>(sK + st * BLOCK_N * LDS, k_base + static_cast<long long>(n1) * k_l, k_l,
                                              k_end - n1, D, vec_k, tid, k);
            load_tile<T, BLOCK_N, HD, NT>(sV + st * BLOCK_N * LDS, v_base + static_cast<long long>(n1) * v_l, v_l,
                                              k_end - n1, Dv, vec_v, tid, v);
        }
        cp_async_commit();

        const int n0 = j * BLOCK_N;
        if (wrow0 >= Lq || n0 >= wk_end) continue;       // whole warp: nothing visible in this tile
        const T* sKs = sK + (j & 1) * BLOCK_N * LDS;
        const T* sVs = sV + (j & 1) * BLOCK_N * LDS;

        // S = Q K^T
        float s[NS][4];
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a[0], a[1], a[2], a[3],
                        smem_u32(sQ + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int jp = 0; jp < NS / 2; ++jp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4(b0r, b1r, b2r, b3r,
                            smem_u32(sKs + (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16
                                     + ((lane >> 3) & 1) * 8));
                mma_16816<T>(s[2 * jp], a, b0r, b1r);
                mma_16816<T>(s[2 * jp + 1], a, b2r, b3r);
            }
        }

        // P = exp2(S * scale * log2e (+ bias) - lse2[row]), hidden entries 0
        const bool full = !MASKED && n0 + BLOCK_N <= Lk && wrow0 + 16 <= Lq
                          && (!causal || n0 + BLOCK_N - 1 <= wrow0 + off);
#pragma unroll
        for (int i = 0; i < NS; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                float x = s[i][e] * scale_log2;
                bool vis = true;
                if (!full) {
                    const int col = n0 + i * 8 + 2 * t4 + (e & 1);
                    vis = col < Lk && row_ok[r];
                    if (causal) vis = vis && col <= qi[r] + off;
                    if (MASKED && vis) {
                        const long long mo = mrow[r] + static_cast<long long>(col) * m_k;
                        if (mask_kind == 1) vis = static_cast<const unsigned char*>(mask)[mo] != 0;
                        else x += load_bias(mask, mo, bias_dtype) * kLog2e;
                    }
                }
                s[i][e] = vis ? fast_exp2(x - l2[r]) : 0.f;
            }
        }

        // dP = dO V^T
        float dp[NS][4];
#pragma unroll
        for (int i = 0; i < NS; ++i) dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a[0], a[1], a[2], a[3],
                        smem_u32(sdO + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
            for (int jp = 0; jp < NS / 2; ++jp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4(b0r, b1r, b2r, b3r,
                            smem_u32(sVs + (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16
                                     + ((lane >> 3) & 1) * 8));
                mma_16816<T>(dp[2 * jp], a, b0r, b1r);
                mma_16816<T>(dp[2 * jp + 1], a, b2r, b3r);
            }
        }

        // dS = P o (dP - delta[row])
#pragma unroll
        for (int i = 0; i < NS; ++i) {
            dp[i][0] = s[i][0] * (dp[i][0] - dl[0]);
            dp[i][1] = s[i][1] * (dp[i][1] - dl[0]);
            dp[i][2] = s[i][2] * (dp[i][2] - dl[1]);
            dp[i][3] = s[i][3] * (dp[i][3] - dl[1]);
        }

        // dQ += dS K: dS from registers as the A operand, K^T-transposed loads as B
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned a[4];
            c_to_a<T>(a, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int dd = 0; dd < HD / 16; ++dd) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                  smem_u32(sKs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                           + dd * 16 + (lane >> 4) * 8));
                mma_16816<T>(dq[2 * dd], a, b0r, b1r);
                mma_16816<T>(dq[2 * dd + 1], a, b2r, b3r);
            }
        }
    }
    cp_async_wait<0>();

    // every row < Lq gets written, rows that see no key with zeros
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!row_ok[r]) continue;
        float* dst = dq_out + (rowbase + qi[r]) * D;
#pragma unroll
        for (int i = 0; i < NO; ++i) {
            const int col = i * 8 + 2 * t4;
            if ((D & 1) == 0) {
                if (col < D) *reinterpret_cast<float2*>(dst + col) = make_float2(dq[i][2 * r] * scale, dq[i][2 * r + 1] * scale);
            } else {
                if (col < D) dst[col] = dq[i][2 * r] * scale;
                if (col + 1 < D) dst[col + 1] = dq[i][2 * r + 1] * scale;
            }
        }
    }
}
