// Flash attention backward for Hopper (sm_90a): TMA + mbarrier ring + wgmma, warp-specialised.
// Recomputes P tile by tile from the forward's lse (as flash_bwd.cu does) but on the wgmma
// tensor-core path; the prep kernel of flash_bwd.cu provides delta = rowsum(dO * O) and
// lse2 = lse * log2(e) (+inf where a row sees no key).
//
// One block (384 threads) owns BN = 128 keys of one (batch, kv head) and loops over the query
// heads of its group and over 64-row query tiles (causal: from the first tile that sees a key):
//   warpgroup 0   producer: after setmaxnreg.dec, one thread loads K and V once, then per query
//                 tile Q and dO (TMA) and that tile's lse2 and delta (64 floats each, bulk copies;
//                 the host pads those rows to whole tiles with +inf / 0) into a STAGES-deep ring.
//   warpgroups 1,2 consumers: warpgroup w owns keys 64w..64w+63 of the block. Per query tile:
//                 S^T  = K_w Q^T          wgmma, A = K_w, B = Q   (shared memory, K-major)
//                 dP^T = V_w dO^T         wgmma, A = V_w, B = dO  (shared memory, K-major)
//                 P^T  = exp2(S^T * scale*log2(e) - lse2),  dS^T = P^T o (dP^T - delta)
//                 dV_w += P^T dO          wgmma, A = P^T from registers, B = dO (MN-major)
//                 dK_w += dS^T Q          wgmma, A = dS^T from registers, B = Q (MN-major)
//                 dS^T -> shared memory (both warpgroups' halves: 128 keys x 64 queries)
//                 dQ[:, w*D/2..] = dS K[:, w*D/2..]     wgmma, A = dS, B = K (both MN-major)
//                 dQ += scale * that, with fp32 vector atomics (red.global.add.v2.f32)
//   dK (times scale) and dV stay in registers over the whole loop (GQA: summed over the group's
//   query heads without atomics) and are written once, in float32.
// The dS^T tile is double-buffered by tile parity: a warpgroup writes tile i's half only after its
// own dQ product of tile i-1 finished, and the other warpgroup's product of tile i-2 (same buffer)
// finished before that warpgroup reached the barrier of tile i-1.
//
// Shared-memory tiles use the TMA 128B-swizzle layout (see flash_fwd_sm90.cu); the dS^T tile is
// written by the consumers in the same layout: row = key (128 bytes = 64 queries), 16-byte unit
// u of row r stored at unit u ^ (r % 8).
//
// Blocks: the key blocks of one (batch, kv head) are consecutive in blockIdx.x (n_block fastest), so
// the blocks running at once share their query head's Q, dO and dQ in L2; block n_block starts its
// walk over the query tiles n_block tiles in (wrapping around), so they do not all add into the
// same dQ rows at the same time.
//
// Template parameters: T (__half / __nv_bfloat16), D (head dim = Dv: 64, 128), STAGES (Q/dO ring).
// Tensor maps are 5-D (D, L, H, B1, B0) as in the forward; `bcast` bits 0-2: q's H, B1, B0
// broadcast, 3-5: k's, 6-8: v's (dO is contiguous). lse2 and delta are (B0, B1, Hq, pitch) with
// pitch = Lq rounded up to 64; dq is contiguous (B0, B1, Hq, Lq, D) float32, dk, dv (B0, B1, Hkv,
// Lk, D) in T when kv_in_t (final: the block has summed its query-head group) or else float32 (the
// host still sums them over batch entries that share a broadcast K/V).
#include "hopper.cuh"

namespace sm90_bwd {

using namespace sm90;
using cupyattn::pack2;
using cupyattn::smem_u32;

constexpr int kBlockN = 128;          // keys per block (2 consumer warpgroups x 64)
constexpr int kBlockM = 64;           // query rows per tile
constexpr int kThreads = 384;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;    // 24*128 + 240*256 = 64512 = 168*384 (the entry budget)

template <int D, int STAGES>
struct Plan {
    static constexpr unsigned kChunks = D / 64;
    static constexpr unsigned kKV = unsigned(kBlockN) * D * 2;   // K (or V): 128 keys
    static constexpr unsigned kQ = unsigned(kBlockM) * D * 2;    // one Q (or dO) tile
    static constexpr unsigned kDS = unsigned(kBlockN) * kBlockM * 2;   // one dS^T tile
    static constexpr unsigned kOffV = kKV;
    static constexpr unsigned kOffQ = 2 * kKV;
    static constexpr unsigned kOffDO = kOffQ + STAGES * kQ;
    static constexpr unsigned kOffDS = kOffDO + STAGES * kQ;
    static constexpr unsigned kRow = kBlockM * 4;                   // 64 floats of lse2 (or delta)
    static constexpr unsigned kOffRow = kOffDS + 2 * kDS;           // lse2[64], delta[64] per stage
    static constexpr unsigned kOffBar = kOffRow + STAGES * 2 * kRow;
    static constexpr unsigned kBars = 1 + 2 * STAGES;                // K/V full; Q/dO full, empty
    static constexpr unsigned kBytes = kOffBar + 8 * kBars + 1024;   // + slack for aligning the base
};

__device__ __forceinline__ void fence_proxy_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// 1-D bulk copy global -> shared (16-byte aligned, size a multiple of 16), counted on `bar`.
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

__device__ __forceinline__ void red_add_v2(float* addr, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n"
                 :: "l"(addr), "f"(a), "f"(b) : "memory");
}

}  // namespace sm90_bwd

template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(sm90_bwd::kThreads, 1)
flash_bwd_sm90_kernel(const __grid_constant__ sm90::TmaMap tm_q, const __grid_constant__ sm90::TmaMap tm_k,
                      const __grid_constant__ sm90::TmaMap tm_v, const __grid_constant__ sm90::TmaMap tm_do,
                      const float* __restrict__ lse2, const float* __restrict__ delta,
                      float* __restrict__ dq, void* __restrict__ dk, void* __restrict__ dv,
                      int Lq, int Lk, int Hq, int Hkv, int group, int nb1, int num_n_blocks, int causal,
                      int bcast, float scale_log2, float scale, int kv_in_t) {
    using namespace sm90_bwd;
    static_assert(D == 64 || D == 128, "head dim 64 or 128 (the dQ product gives each warpgroup D/2 columns)");
    using P = Plan<D, STAGES>;
    static_assert(P::kBytes <= 227 * 1024, "shared memory");

    extern __shared__ unsigned char smem_raw[];
    const unsigned base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    unsigned char* const base_ptr = smem_raw + (base - smem_u32(smem_raw));
    const unsigned sK = base, sV = base + P::kOffV, sQ = base + P::kOffQ, sDO = base + P::kOffDO;
    const unsigned sDS = base + P::kOffDS, sRow = base + P::kOffRow;
    const float* const row_vals = reinterpret_cast<const float*>(base_ptr + P::kOffRow);   // [stage][lse2 | delta]
    const unsigned bars = base + P::kOffBar;
    const unsigned bar_kv = bars;
    auto bar_full = [&](int s) { return bars + 8u * (1 + s); };
    auto bar_empty = [&](int s) { return bars + 8u * (1 + STAGES + s); };

    // ---- this block's keys and the query tiles that can see them ------------------------------
    const int kv_bh = blockIdx.x / num_n_blocks;
    const int n_block = blockIdx.x - kv_bh * num_n_blocks;
    const int hk = kv_bh % Hkv;
    const int bb = kv_bh / Hkv;
    const int b1 = bb % nb1, b0 = bb / nb1;
    const int k0 = n_block * kBlockN;
    const int diag = Lk - Lq;                             // key j visible to query i iff j - i <= diag
    int qt_start = 0;
    if (causal) {
        const long long q_min = static_cast<long long>(k0) - diag;   // first query that sees key k0
        qt_start = q_min <= 0 ? 0 : static_cast<int>(min(q_min, static_cast<long long>(Lq)) / kBlockM);
    }
    const int n_qt = (Lq + kBlockM - 1) / kBlockM;
    const int per_head = max(0, n_qt - qt_start);
    const int n_items = per_head * group;
    const int pitch = n_qt * kBlockM;                     // entries per row of lse2 / delta
    const int rot = n_items > 0 ? n_block % n_items : 0;
    // item it -> (query head in the group, first query row), starting `rot` items in
    auto item = [&](int it, int& g, int& q0) {
        int r = it + rot;
        if (r >= n_items) r -= n_items;
        g = r / per_head;
        q0 = (qt_start + r - g * per_head) * kBlockM;
    };

    if (threadIdx.x == 0) {
        mbar_init(bar_kv, 1);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bar_full(s), 1);
            mbar_init(bar_empty(s), 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // =========================== producer warpgroup ===========================================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(kProducerRegs));
        if (threadIdx.x == 0 && n_items > 0) {   // no tile: the block must not leave loads in flight
            tma_prefetch_map(&tm_q);
            tma_prefetch_map(&tm_do);
            const int kh = (bcast & 8) ? 0 : hk, kb1 = (bcast & 16) ? 0 : b1, kb0 = (bcast & 32) ? 0 : b0;
            const int vh = (bcast & 64) ? 0 : hk, vb1 = (bcast & 128) ? 0 : b1, vb0 = (bcast & 256) ? 0 : b0;
            mbar_arrive_expect_tx(bar_kv, 2 * P::kKV);
#pragma unroll
            for (int c = 0; c < static_cast<int>(P::kChunks); ++c) {
                tma_load_5d(sK + c * (kBlockN * 128u), &tm_k, bar_kv, c * 64, k0, kh, kb1, kb0);
                tma_load_5d(sV + c * (kBlockN * 128u), &tm_v, bar_kv, c * 64, k0, vh, vb1, vb0);
            }
            RingPos pos;
#pragma unroll 1
            for (int it = 0; it < n_items; ++it) {
                int g, q0;
                item(it, g, q0);
                const int h = hk * group + g;
                const int qh = (bcast & 1) ? 0 : h, qb1 = (bcast & 2) ? 0 : b1, qb0 = (bcast & 4) ? 0 : b0;
                const long long rb = (static_cast<long long>(bb) * Hq + h) * pitch + q0;
                const int s = pos.stage;
                mbar_wait(bar_empty(s), pos.phase ^ 1u);
                mbar_arrive_expect_tx(bar_full(s), 2 * P::kQ + 2 * P::kRow);
#pragma unroll
                for (int c = 0; c < static_cast<int>(P::kChunks); ++c) {
                    tma_load_5d(sQ + s * P::kQ + c * (kBlockM * 128u), &tm_q, bar_full(s), c * 64, q0, qh, qb1, qb0);
                    tma_load_5d(sDO + s * P::kQ + c * (kBlockM * 128u), &tm_do, bar_full(s), c * 64, q0, h, b1, b0);
                }
                bulk_load(sRow + s * 2 * P::kRow, lse2 + rb, P::kRow, bar_full(s));
                bulk_load(sRow + s * 2 * P::kRow + P::kRow, delta + rb, P::kRow, bar_full(s));
                pos.advance<STAGES>();
            }
        }
    } else {
        // =========================== consumer warpgroups ==========================================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(kConsumerRegs));
        const int ct = static_cast<int>(threadIdx.x) - 128;
        const int w = ct >> 7;                  // which consumer warpgroup: keys 64w..64w+63
        const int tw = ct & 127;
        const int warp = tw >> 5, lane = tw & 31;
        const int g8 = lane >> 2, t4 = lane & 3;
        const int kw0 = k0 + w * 64;            // this warpgroup's first key
        const int key_lo = kw0 + warp * 16 + g8, key_hi = key_lo + 8;
        const unsigned sKw = sK + w * (64u * 128u), sVw = sV + w * (64u * 128u);

        float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) { dk_acc[i] = 0.f; dv_acc[i] = 0.f; }

        if (n_items > 0) mbar_wait(bar_kv, 0);
        RingPos pos;
#pragma unroll 1
        for (int it = 0; it < n_items; ++it) {
            int g, q0;
            item(it, g, q0);
            const int h = hk * group + g;
            const int s = pos.stage;
            const unsigned sQs = sQ + s * P::kQ, sDOs = sDO + s * P::kQ;
            const unsigned sDSb = sDS + (it & 1) * P::kDS;
            mbar_wait(bar_full(s), pos.phase);

            // ---- S^T = K_w Q^T and dP^T = V_w dO^T (64 keys x 64 queries each) -------------------
            float st[32], dpt[32];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned off_a = (kk / 4) * (kBlockN * 128u) + (kk % 4) * 32u;
                const unsigned off_b = (kk / 4) * (kBlockM * 128u) + (kk % 4) * 32u;
                Wgmma<T, 64>::ss(st, make_desc(sKw + off_a, 16u, 1024u), make_desc(sQs + off_b, 16u, 1024u), kk > 0 ? 1 : 0);
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned off_a = (kk / 4) * (kBlockN * 128u) + (kk % 4) * 32u;
                const unsigned off_b = (kk / 4) * (kBlockM * 128u) + (kk % 4) * 32u;
                Wgmma<T, 64>::ss(dpt, make_desc(sVw + off_a, 16u, 1024u), make_desc(sDOs + off_b, 16u, 1024u), kk > 0 ? 1 : 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(st);
            fence_regs(dpt);

            // ---- P^T and dS^T in registers (columns are queries) ---------------------------------
            const float* vals = row_vals + s * 2 * kBlockM;
            const int last_key = kw0 + 63;
            const bool need_mask = last_key >= Lk || (causal && last_key - q0 > diag);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = 8 * j + 2 * t4 + (e & 1);
                    float p = cupyattn::fast_exp2(fmaf(st[4 * j + e], scale_log2, -vals[col]));
                    if (need_mask) {
                        const int key = e < 2 ? key_lo : key_hi;
                        if (key >= Lk || (causal && key - (q0 + col) > diag)) p = 0.f;
                    }
                    st[4 * j + e] = p;
                    dpt[4 * j + e] = p * (dpt[4 * j + e] - vals[kBlockM + col]);
                }
            }
            unsigned pa[4][4], pds[4][4];
            to_a_frags<T, 64>(st, pa);
            to_a_frags<T, 64>(dpt, pds);

            // dS^T rows key_lo / key_hi of this warpgroup's half, 128B-swizzled (unit j ^ row % 8);
            // pds[kk] holds (row lo, unit 2kk), (hi, 2kk), (lo, 2kk+1), (hi, 2kk+1) at byte 4*t4
            {
                const unsigned r_lo = static_cast<unsigned>(w * 64 + warp * 16 + g8), r_hi = r_lo + 8;
                const unsigned row_lo = sDSb + r_lo * 128u + 4u * t4, row_hi = sDSb + r_hi * 128u + 4u * t4;
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    const unsigned u0 = 2u * kk, u1 = 2u * kk + 1u;
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(row_lo + ((u0 ^ (r_lo & 7u)) << 4)), "r"(pds[kk][0]) : "memory");
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(row_hi + ((u0 ^ (r_hi & 7u)) << 4)), "r"(pds[kk][1]) : "memory");
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(row_lo + ((u1 ^ (r_lo & 7u)) << 4)), "r"(pds[kk][2]) : "memory");
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(row_hi + ((u1 ^ (r_hi & 7u)) << 4)), "r"(pds[kk][3]) : "memory");
                }
            }
            fence_proxy_async_smem();           // the generic-proxy stores, visible to wgmma

            // ---- dV += P^T dO, dK += dS^T Q (64 keys x D) -----------------------------------------
            fence_regs(dv_acc);
            fence_regs(dk_acc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < kBlockM / 16; ++kk)
                Wgmma<T, D>::rs(dv_acc, pa[kk], make_desc(sDOs + kk * 2048u, kBlockM * 128u, 1024u), 1);
#pragma unroll
            for (int kk = 0; kk < kBlockM / 16; ++kk)
                Wgmma<T, D>::rs(dk_acc, pds[kk], make_desc(sQs + kk * 2048u, kBlockM * 128u, 1024u), 1);
            wgmma_commit();

            // ---- dQ[:, w*D/2..] = dS K[:, w*D/2..]: both halves of dS^T must be in shared memory --
            // columns w*D/2.. of K: 64-column chunk (w*D/2)/64, then 2 bytes per column inside its
            // 128-byte rows (D = 64: the second warpgroup starts 64 bytes in; the hardware swizzle
            // applies to the address, as for the K-steps inside a chunk of the S products)
            named_bar_sync(1, 256);
            constexpr int kNQ = D / 2;
            const unsigned k_cols = static_cast<unsigned>(w * kNQ);
            const unsigned sKq = sK + (k_cols / 64u) * (kBlockN * 128u) + (k_cols % 64u) * 2u;
            float dq_acc[kNQ / 2];
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk)
                WgmmaT<T, kNQ>::ss(dq_acc, make_desc(sDSb + kk * 2048u, kBlockM * 128u, 1024u),
                                   make_desc(sKq + kk * 2048u, kBlockN * 128u, 1024u), kk > 0 ? 1 : 0);
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(dq_acc);
            fence_regs(dv_acc);
            fence_regs(dk_acc);
            mbar_arrive(bar_empty(s));          // Q, dO and the row values of this stage are free

            const long long rb = (static_cast<long long>(bb) * Hq + h) * Lq;
            const int q_lo = q0 + warp * 16 + g8, q_hi = q_lo + 8;
            float* dq_lo = dq + (rb + q_lo) * D + w * kNQ + 2 * t4;
            float* dq_hi = dq + (rb + q_hi) * D + w * kNQ + 2 * t4;
#pragma unroll
            for (int j = 0; j < kNQ / 8; ++j) {
                if (q_lo < Lq) red_add_v2(dq_lo + 8 * j, scale * dq_acc[4 * j + 0], scale * dq_acc[4 * j + 1]);
                if (q_hi < Lq) red_add_v2(dq_hi + 8 * j, scale * dq_acc[4 * j + 2], scale * dq_acc[4 * j + 3]);
            }
            pos.advance<STAGES>();
        }

        // ---- dK (times scale) and dV straight from registers: in T when final (kv_in_t), which
        // spares a float32 round trip through memory and a cast; else float32 ------------------
        const long long kb = static_cast<long long>(kv_bh) * Lk;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = half ? key_hi : key_lo;
            if (key >= Lk) continue;
            const long long off = (kb + key) * D + 2 * t4;
            if (kv_in_t) {
                T* dk_row = static_cast<T*>(dk) + off;
                T* dv_row = static_cast<T*>(dv) + off;
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    *reinterpret_cast<unsigned*>(dk_row + 8 * j) =
                        pack2<T>(scale * dk_acc[4 * j + 2 * half], scale * dk_acc[4 * j + 2 * half + 1]);
                    *reinterpret_cast<unsigned*>(dv_row + 8 * j) =
                        pack2<T>(dv_acc[4 * j + 2 * half], dv_acc[4 * j + 2 * half + 1]);
                }
            } else {
                float* dk_row = static_cast<float*>(dk) + off;
                float* dv_row = static_cast<float*>(dv) + off;
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    *reinterpret_cast<float2*>(dk_row + 8 * j) =
                        make_float2(scale * dk_acc[4 * j + 2 * half], scale * dk_acc[4 * j + 2 * half + 1]);
                    *reinterpret_cast<float2*>(dv_row + 8 * j) =
                        make_float2(dv_acc[4 * j + 2 * half], dv_acc[4 * j + 2 * half + 1]);
                }
            }
        }
    }
}
