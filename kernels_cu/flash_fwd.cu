// Flash attention forward (sm_80+): tiled, online softmax, mma.sync m16n8k16 on tensor cores.
//
// One block owns BLOCK_M query rows (16 per warp) of one (batch, head) and streams BLOCK_N-key
// tiles of K and V through a 2-stage cp.async ring in shared memory. Scores, the running row max
// and row sum live in registers (log2 domain: log2(e) is folded into the scale); P is converted
// to the input dtype in registers and fed back as the A operand of the P.V mma.
//
// Template parameters:
//   T          __half or __nv_bfloat16
//   HD         padded head dim (multiple of 32, 32..256); the real D and Dv (<= HD) are runtime
//              values, columns beyond them are zero-filled in shared memory on load
//   BLOCK_M    query rows per block (= 16 * NWARPS)
//   BLOCK_N    keys per tile (multiple of 16)
//   NWARPS     warps per block
//   MASK_KIND  0 none, 1 boolean (nonzero = may attend), 2 additive bias (dtype chosen at run time)
//
// Runtime features: causal (bottom-right), GQA/MQA by head index (optionally packing the query
// heads of one kv head into the M dimension for decode), two batch levels with arbitrary int64
// strides, split-KV (partials in float32, merged by flash_merge_kernel).
#include "common.cuh"

using namespace cupyattn;

namespace {

constexpr int kStages = 2;

template <int HD>
struct SmemLayout {
    static constexpr int LDS = HD + 8;   // row pitch in elements: +16 bytes keeps ldmatrix conflict-free
};

}  // namespace

template <typename T, int HD, int BLOCK_M, int BLOCK_N, int NWARPS, int MASK_KIND>
__global__ void __launch_bounds__(NWARPS * 32, 1)
flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 const void* __restrict__ mask, T* __restrict__ out, float* __restrict__ lse_out,
                 float* __restrict__ part_out, float* __restrict__ part_lse,
                 int Lq, int Lk, int D, int Dv, int Hq, int group, int nb_inner, int num_m_blocks,
                 int num_splits, int keys_per_split, int causal, int pack_gqa, int bias_dtype,
                 int vec_flags, float scale_log2, long long total_rows,
                 long long q_b0, long long q_b1, long long q_h, long long q_l,
                 long long k_b0, long long k_b1, long long k_h, long long k_l,
                 long long v_b0, long long v_b1, long long v_h, long long v_l,
                 long long m_b0, long long m_b1, long long m_h, long long m_q, long long m_k) {
    constexpr int NT = NWARPS * 32;
    constexpr int LDS = SmemLayout<HD>::LDS;
    constexpr bool Q_IN_REGS = HD <= 128;
    constexpr int KSTEPS = HD / 16;         // k-steps of Q.K^T over the head dim
    constexpr int NS = BLOCK_N / 8;         // n-tiles of the score tile
    constexpr int NO = HD / 8;              // n-tiles of the output accumulator
    static_assert(BLOCK_M == 16 * NWARPS, "one warp per 16 query rows");
    static_assert(HD % 32 == 0 && HD <= 256, "padded head dim");
    static_assert(BLOCK_N % 16 == 0, "key tile");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BLOCK_M * LDS;
    T* sV = sK + kStages * BLOCK_N * LDS;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;

    // ---- which rows, heads and keys this block owns (everything in grid.x) --------------------
    long long bid = blockIdx.x;
    const int mb = num_m_blocks - 1 - static_cast<int>(bid % num_m_blocks);   // heavy causal blocks first
    bid /= num_m_blocks;
    const int split = static_cast<int>(bid % num_splits);
    bid /= num_splits;
    const int hkv_count = Hq / group;
    const int hgrid = pack_gqa ? hkv_count : Hq;
    const int hh = static_cast<int>(bid % hgrid);
    const long long bflat = bid / hgrid;
    const int b1 = static_cast<int>(bflat % nb_inner);
    const long long b0 = bflat / nb_inner;
    const int hkv = pack_gqa ? hh : hh / group;
    const int rows_total = pack_gqa ? group * Lq : Lq;
    const int row0 = mb * BLOCK_M;

    int k_end = Lk;
    if (causal && !pack_gqa) {
        const int qlast = min(row0 + BLOCK_M, Lq) - 1;
        k_end = min(Lk, qlast + 1 + (Lk - Lq));
    }
    const int k_begin = split * keys_per_split;
    k_end = min(k_end, k_begin + keys_per_split);
    const int n_tiles = k_end > k_begin ? (k_end - k_begin + BLOCK_N - 1) / BLOCK_N : 0;

    const T* k_base = k + b0 * k_b0 + b1 * k_b1 + hkv * k_h;
    const T* v_base = v + b0 * v_b0 + b1 * v_b1 + hkv * v_h;
    const bool vec_q = vec_flags & 1, vec_k = vec_flags & 2, vec_v = vec_flags & 4;

    // ---- prologue: Q and the first K/V tile in one cp.async group ------------------------------
    if (n_tiles > 0) {
        if (vec_q) {
            constexpr int CPR = HD / 8;
            for (int c = tid; c < BLOCK_M * CPR; c += NT) {
                const int r = c / CPR, ch = c % CPR;
                const int row = row0 + r;
                const bool ok = row < rows_total && ch * 8 < D;
                const T* src = q;
                if (ok) {
                    const int head = pack_gqa ? hkv * group + row / Lq : hh;
                    const int qi = pack_gqa ? row % Lq : row;
                    src = q + b0 * q_b0 + b1 * q_b1 + head * q_h + qi * q_l + ch * 8;
                }
                cp_async_16(smem_u32(sQ + r * LDS + ch * 8), src, ok ? 16 : 0);
            }
        } else {
            const unsigned short* qs = reinterpret_cast<const unsigned short*>(q);
            unsigned short* ss = reinterpret_cast<unsigned short*>(sQ);
            for (int e = tid; e < BLOCK_M * HD; e += NT) {
                const int r = e / HD, c = e % HD;
                const int row = row0 + r;
                unsigned short val = 0;
                if (row < rows_total && c < D) {
                    const int head = pack_gqa ? hkv * group + row / Lq : hh;
                    const int qi = pack_gqa ? row % Lq : row;
                    val = qs[b0 * q_b0 + b1 * q_b1 + head * q_h + qi * q_l + c];
                }
                ss[r * LDS + c] = val;
            }
        }
        load_tile<T, BLOCK_N, HD, NT>(sK, k_base + k_begin * k_l, k_l, k_end - k_begin, D, vec_k, tid, k);
        load_tile<T, BLOCK_N, HD, NT>(sV, v_base + k_begin * v_l, v_l, k_end - k_begin, Dv, vec_v, tid, v);
    }
    cp_async_commit();

    // ---- this thread's rows ---------------------------------------------------------------------
    const int wrow0 = row0 + warp * 16;
    const bool warp_active = wrow0 < rows_total;
    int row_id[2], head_of[2], qi_of[2], climit[2];
    bool row_ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_id[r] = wrow0 + g + 8 * r;
        row_ok[r] = row_id[r] < rows_total;
        head_of[r] = pack_gqa ? hkv * group + row_id[r] / Lq : hh;
        qi_of[r] = pack_gqa ? row_id[r] % Lq : row_id[r];
        climit[r] = qi_of[r] + (Lk - Lq);     // key j visible iff j <= climit (causal)
    }
    int wk_end = k_end;                        // keys past this are hidden from the whole warp
    if (causal && !pack_gqa) wk_end = min(k_end, min(wrow0 + 15, Lq - 1) + 1 + (Lk - Lq));

    const unsigned char* mrow[2] = {nullptr, nullptr};
    if (MASK_KIND != 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long off = b0 * m_b0 + b1 * m_b1 + static_cast<long long>(head_of[r]) * m_h
                                + static_cast<long long>(qi_of[r]) * m_q;
            const int esize = MASK_KIND == 1 ? 1 : (bias_dtype <= 1 ? 2 : (bias_dtype == 2 ? 4 : 8));
            mrow[r] = static_cast<const unsigned char*>(mask) + off * esize;
        }
    }

    float o[NO][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_part[2] = {0.f, 0.f};
    unsigned qf[Q_IN_REGS ? KSTEPS : 1][4];

    // ---- main loop over key tiles ---------------------------------------------------------------
    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<0>();
        __syncthreads();   // tile j visible to all; every warp is done with tile j-1's stage
        if (j + 1 < n_tiles) {
            const int n1 = k_begin + (j + 1) * BLOCK_N;
            const int st = (j + 1) & 1;
            load_tile<T, BLOCK_N, HD, NT>(sK + st * BLOCK_N * LDS, k_base + n1 * k_l, k_l, k_end - n1, D,
                                          vec_k, tid, k);
            load_tile<T, BLOCK_N, HD, NT>(sV + st * BLOCK_N * LDS, v_base + n1 * v_l, v_l, k_end - n1, Dv,
                                          vec_v, tid, v);
        }
        cp_async_commit();

        if (Q_IN_REGS && j == 0 && warp_active) {
#pragma unroll
            for (int kk = 0; kk < (Q_IN_REGS ? KSTEPS : 1); ++kk)
                ldmatrix_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                            smem_u32(sQ + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
        }

        const int n0 = k_begin + j * BLOCK_N;
        if (!warp_active || n0 >= wk_end) continue;   // whole warp: no visible key in this tile
        const T* sKs = sK + (j & 1) * BLOCK_N * LDS;
        const T* sVs = sV + (j & 1) * BLOCK_N * LDS;

        // S = Q K^T (fp32)
        float s[NS][4];
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[4];
            if constexpr (Q_IN_REGS) {
                a[0] = qf[kk][0]; a[1] = qf[kk][1]; a[2] = qf[kk][2]; a[3] = qf[kk][3];
            } else {
                ldmatrix_x4(a[0], a[1], a[2], a[3],
                            smem_u32(sQ + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
            }
#pragma unroll
            for (int jp = 0; jp < BLOCK_N / 16; ++jp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4(b0r, b1r, b2r, b3r,
                            smem_u32(sKs + (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16
                                     + ((lane >> 3) & 1) * 8));
                mma_16816<T>(s[2 * jp], a, b0r, b1r);
                mma_16816<T>(s[2 * jp + 1], a, b2r, b3r);
            }
        }

        // scale into the log2 domain, bias, hide keys
        const bool need_mask = MASK_KIND != 0 || n0 + BLOCK_N > k_end
                               || (causal && (pack_gqa || n0 + BLOCK_N - 1 > wrow0 + (Lk - Lq)));
        if (need_mask) {
#pragma unroll
            for (int i = 0; i < NS; ++i) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const int col = n0 + i * 8 + 2 * t4 + (e & 1);
                    float x = s[i][e] * scale_log2;
                    bool vis = col < k_end;
                    if (causal) vis = vis && col <= climit[r];
                    if (MASK_KIND == 1) {
                        vis = vis && (!row_ok[r] || mrow[r][static_cast<long long>(col) * m_k] != 0);
                    } else if (MASK_KIND == 2) {
                        if (vis && row_ok[r]) x += load_bias(mrow[r], static_cast<long long>(col) * m_k, bias_dtype) * kLog2e;
                    }
                    s[i][e] = vis ? x : -INFINITY;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < NS; ++i) {
                s[i][0] *= scale_log2; s[i][1] *= scale_log2; s[i][2] *= scale_log2; s[i][3] *= scale_log2;
            }
        }

        // online softmax (rows g and g+8 of this warp; a quad of lanes shares a row)
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int i = 0; i < NS; ++i) {
            mx[0] = fmaxf(mx[0], fmaxf(s[i][0], s[i][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[i][2], s[i][3]));
        }
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = quad_max(mx[r]);
            m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];   // no -inf - -inf
            alpha[r] = fast_exp2(m_run[r] - m_use[r]);      // m_run = -inf gives 0
            m_run[r] = mx[r];
            l_part[r] *= alpha[r];
        }
#pragma unroll
        for (int i = 0; i < NS; ++i) {
            s[i][0] = fast_exp2(s[i][0] - m_use[0]);
            s[i][1] = fast_exp2(s[i][1] - m_use[0]);
            s[i][2] = fast_exp2(s[i][2] - m_use[1]);
            s[i][3] = fast_exp2(s[i][3] - m_use[1]);
            l_part[0] += s[i][0] + s[i][1];
            l_part[1] += s[i][2] + s[i][3];
        }
#pragma unroll
        for (int i = 0; i < NO; ++i) {
            o[i][0] *= alpha[0]; o[i][1] *= alpha[0];
            o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
        }

        // O += P V, P straight from registers as the A operand
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                unsigned b0r, b1r, b2r, b3r;
                ldmatrix_x4_trans(b0r, b1r, b2r, b3r,
                                  smem_u32(sVs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS
                                           + dp * 16 + (lane >> 4) * 8));
                mma_16816<T>(o[2 * dp], a, b0r, b1r);
                mma_16816<T>(o[2 * dp + 1], a, b2r, b3r);
            }
        }
    }
    cp_async_wait<0>();

    // ---- epilogue: normalise, write out (or the split partial) and lse once per row ------------
    if (!warp_active) return;
    const long long rows_all = total_rows;   // batch * Hq * Lq
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(l_part[r]);
        if (!row_ok[r]) continue;
        const float inv = l == 0.f ? 0.f : 1.f / l;            // NaN stays NaN
        const float lse = l == 0.f ? -INFINITY : (m_run[r] + fast_log2(l)) * kLn2;
        const long long rid = (bflat * Hq + head_of[r]) * Lq + qi_of[r];
        if (num_splits == 1) {
            T* orow = out + rid * Dv;
#pragma unroll
            for (int i = 0; i < NO; ++i) {
                const int col = i * 8 + 2 * t4;
                if (col < Dv) {
                    const float x0 = o[i][2 * r] * inv, x1 = o[i][2 * r + 1] * inv;
                    if ((Dv & 1) == 0) {
                        *reinterpret_cast<unsigned*>(orow + col) = pack2<T>(x0, x1);
                    } else {
                        orow[col] = from_float<T>(x0);
                        if (col + 1 < Dv) orow[col + 1] = from_float<T>(x1);
                    }
                }
            }
            if (t4 == 0) lse_out[rid] = lse;
        } else {
            const long long prid = split * rows_all + rid;
            float* orow = part_out + prid * Dv;
#pragma unroll
            for (int i = 0; i < NO; ++i) {
                const int col = i * 8 + 2 * t4;
                if (col < Dv) orow[col] = o[i][2 * r] * inv;
                if (col + 1 < Dv) orow[col + 1] = o[i][2 * r + 1] * inv;
            }
            if (t4 == 0) part_lse[prid] = lse;
        }
    }
}

// Merges split-KV partials: part_out (num_splits, rows, Dv) float32 normalised per split and
// part_lse (num_splits, rows) natural log; one block per row.
template <typename T>
__global__ void __launch_bounds__(128)
flash_merge_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                   T* __restrict__ out, float* __restrict__ lse_out, long long rows, int num_splits, int Dv) {
    const long long row = blockIdx.x;
    float m = -INFINITY;
    for (int s = 0; s < num_splits; ++s) m = fmaxf(m, part_lse[s * rows + row]);
    float total = -INFINITY;
    if (m != -INFINITY) {
        float sum = 0.f;
        for (int s = 0; s < num_splits; ++s) sum += expf(part_lse[s * rows + row] - m);
        total = m + logf(sum);
    }
    for (int col = threadIdx.x; col < Dv; col += blockDim.x) {
        float acc = 0.f;
        if (total != -INFINITY) {
            for (int s = 0; s < num_splits; ++s)
                acc += expf(part_lse[s * rows + row] - total) * part_out[(s * rows + row) * Dv + col];
        }
        out[row * Dv + col] = from_float<T>(acc);
    }
    if (threadIdx.x == 0) lse_out[row] = total;
}
