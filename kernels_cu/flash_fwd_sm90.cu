// Flash attention forward for Hopper (sm_90a): TMA + mbarrier ring + wgmma, warp-specialised.
//
// One block (128 * (CONSUMERS + 1) threads) works on tiles of BLOCK_M = 64 * CONSUMERS query rows
// of one (batch, q-head); CONSUMERS is 2 (384 threads, 128 rows) or 3 (512 threads, 192 rows, D=64
// only, see Roles):
//   warpgroup 0   producer: after setmaxnreg.dec, warp 0 draws the tiles (below) and streams K
//                 and V tiles by TMA into a STAGES-deep shared-memory ring (full barriers carry the
//                 transaction bytes, empty barriers are released by the consumers, K and V
//                 separately); warp 1 loads Q, one 64-row part per consumer warpgroup.
//   warpgroups 1..CONSUMERS consumers: each owns 64 query rows. Per key tile: S = Q K^T with wgmma
//                 (A = Q and B = K from shared memory, K-major, 128-byte swizzle), online softmax
//                 in registers (exp2, scale*log2(e) folded in), P converted in registers to the
//                 wgmma A-fragment layout, O += P V with wgmma (A from registers, B = V from
//                 shared memory, MN-major, i.e. trans-b).
// Overlap, at two levels (see pingpong_body): the consumer warpgroups take turns on the tensor
// cores (ping-pong; round robin with three), so one's softmax runs under the others' GEMMs; and
// inside a warpgroup the S GEMM of tile i is issued together with the PV GEMM of tile i-1, so the
// softmax of tile i runs while that PV GEMM is still on the tensor cores.
// Key tiles are visited from the last to the first so the masked tiles (the causal diagonal, the
// partial tile at Lk) come first. Causal is bottom-right: query i sees key j iff j <= i + Lk - Lq.
//
// Shared-memory tiles are stored in the TMA 128B-swizzle layout: a tile of R rows x D columns is
// D/64 "column chunks", each R rows x 128 bytes, with rows at a 128-byte pitch and the 16-byte
// units of a row XOR-permuted by (row % 8) (hardware swizzle, the same for TMA and wgmma as
// long as every chunk starts 1024-byte aligned).
//
// Template parameters: T (__half / __nv_bfloat16), D (head dim = Dv: 64, 128, 256), BN (keys per
// tile), STAGES (ring depth), CONSUMERS (consumer warpgroups, 2 by default, or 3). The host
// launches one block per tile or, for a persistent grid, one per SM; num_tiles is the number of
// BLOCK_M-row tiles (m-blocks x batch x heads). A block starts at tile blockIdx.x and then takes
//   * with sched == nullptr: blockIdx.x + gridDim.x, + 2 gridDim.x, ... (static stride);
//   * with sched (two ints, zero at launch): gridDim.x + atomicAdd(sched, 1), i.e. the next tile
//     nobody has taken (dynamic). Causal tiles differ in cost up to Lk/BN times, and a static stride
//     hands some blocks far more work than others (a simulated H100 schedule at L=4k, D=128: the
//     busiest block ends 17% after the mean); drawing tiles on demand leaves a tail of one light tile.
//     The last block to finish sets both ints back to zero, so the next launch on the stream finds
//     them ready without a memset.
// The K/V producer thread draws the tiles (it is the role that runs furthest ahead: STAGES key
// tiles before the consumers) and passes them to the Q loader and the consumers through a
// four-slot shared-memory queue (TileQueue); a tile index >= num_tiles tells every role to stop.
// It draws tile i+1 as it starts issuing tile i's loads and reads the answer once those are out,
// so the atomic's latency is hidden; a first version drew from the Q loader, one tile later,
// and the K/V producer then waited for every short tile's index (H100, D=64 L=1k causal: 296
// TFLOP/s now, 192 then). Measured against the static stride (tools/ab_sm90.py, H100): causal
// rows gain 5-13% at D <= 128; at D=256 with L=16k causal the hardware's own block scheduling
// (one block per tile) is faster still, and the host picks it there (_flash_sm90.grid_kind).
#include "hopper.cuh"

namespace sm90 {

// The block's shape for CONSUMERS consumer warpgroups (2 or 3) of 64 query rows each, plus the
// producer warpgroup. setmaxnreg moves registers from the producer to the consumers; the budget
// is the 64K-register file of one SM (one block per SM):
//   2 consumers: 24*128 + 240*256 = 64512 = 168*384 (the entry budget at 384 threads). 240 lets
//                D=256 hold BN=80 (at 232 its consumers spilled 68 bytes); the producer fits 24
//                with its ring position as one count and a down-count of key tiles;
//   3 consumers: 32*128 + 160*384 = 65536 = 128*512, the whole file (the entry budget at 512
//                threads). D=64 only: O, S and P of a 64 x BN tile need 32 + BN/2 + BN/4 registers
//                of the 160, 128 at BN=128 (BN=192 spills). The producer keeps 32: it fits in
//                24, but the next step for the consumers, 168, would not fit the file.
template <int CONSUMERS>
struct Roles {
    static_assert(CONSUMERS == 2 || CONSUMERS == 3, "2 or 3 consumer warpgroups");
    static constexpr int kBlockM = 64 * CONSUMERS;          // query rows per block
    static constexpr int kThreads = 128 * (CONSUMERS + 1);  // producer warpgroup + consumers
    static constexpr int kProducerRegs = CONSUMERS == 2 ? 24 : 32;
    static constexpr int kConsumerRegs = CONSUMERS == 2 ? 240 : 160;
    static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0, "setmaxnreg takes multiples of 8");
    static_assert(kProducerRegs >= 24 && kConsumerRegs <= 256, "setmaxnreg range");
    static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * CONSUMERS <= 65536, "register file");
};

// Shared-memory plan (byte offsets from a 1024-aligned base). The host repeats smem_bytes().
template <int D, int BN, int STAGES, int CONSUMERS>
struct Plan {
    static constexpr unsigned kChunks = D / 64;                 // 64-column (128-byte) chunks
    static constexpr unsigned kQPart = 64u * D * 2;             // one consumer's 64 Q rows
    static constexpr unsigned kQ = CONSUMERS * kQPart;
    static constexpr unsigned kKV = unsigned(BN) * D * 2;       // one stage of K (or of V)
    // Q full/empty per consumer; K, V full/empty per stage
    static constexpr unsigned kBars = 2 * CONSUMERS + 4 * STAGES;
    // the tile queue (TileQueue: 4 x (full, empty, int)) and slack for aligning the base
    static constexpr unsigned kFixed = 8 * kBars + 80 + 1024;
    // With two consumers, where 227 KB allow, O is staged in a buffer of its own (one 64-row part
    // per consumer, like Q) and a tile's end is deferred into the next tile's first turn (see the top).
    static constexpr bool kDeferEnd = CONSUMERS == 2 && 2 * kQ + 2 * STAGES * kKV + kFixed <= 227u * 1024u;
    static constexpr unsigned kOffK = kQ;
    static constexpr unsigned kOffV = kOffK + STAGES * kKV;
    static constexpr unsigned kOffO = kOffV + STAGES * kKV;       // 1024-aligned, as the swizzle needs
    static constexpr unsigned kOffBar = kOffO + (kDeferEnd ? kQ : 0u);
    static constexpr unsigned kOffQueue = kOffBar + 8 * kBars;
    static constexpr unsigned kBytes = kOffBar + kFixed;
};

// ---- consumer building blocks (one warpgroup, 64 query rows) ----------------------------------

// Issues S = Q K^T for one key tile (not committed). sQw: this warpgroup's Q (64 x D),
// sKs: the K stage (BN x D); both K-major, 128B swizzle, D/64 column chunks.
template <typename T, int D, int BN>
__device__ __forceinline__ void issue_qk(float (&sc)[BN / 2], unsigned sQw, unsigned sKs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned long long da = make_desc(sQw + (kk / 4) * (64u * 128u) + (kk % 4) * 32u, 16u, 1024u);
        const unsigned long long db = make_desc(sKs + (kk / 4) * (BN * 128u) + (kk % 4) * 32u, 16u, 1024u);
        Wgmma<T, BN>::ss(sc, da, db, kk > 0 ? 1 : 0);
    }
}

// Issues O += P V for one key tile (not committed). sVs: the V stage (BN keys x D), MN-major for
// the B operand: 16 keys = 2048 bytes per k-step, column chunks BN*128 bytes apart (LBO).
template <typename T, int D, int BN>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const unsigned (&pa)[BN / 16][4], unsigned sVs) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        const unsigned long long db = make_desc(sVs + kk * 2048u, BN * 128u, 1024u);
        Wgmma<T, D>::rs(o, pa[kk], db, 1);
    }
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 2], float corr_lo, float corr_hi) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        o[4 * j + 0] *= corr_lo;
        o[4 * j + 1] *= corr_lo;
        o[4 * j + 2] *= corr_hi;
        o[4 * j + 3] *= corr_hi;
    }
}

// ================================================================================================
// The consumer loop: ping-pong between warpgroups plus intra-warpgroup overlap, written
// for a persistent grid (each block loops over tiles blockIdx.x, +gridDim.x, ...; the host may
// also launch one block per tile, then the loop runs once).
//
//  * The consumer warpgroups take turns on the tensor cores, round robin: before issuing its
//    GEMMs warpgroup w waits on its own named barrier (3 + w, 256 threads: its own 128 plus the
//    128 of the arriving warpgroup) and after issuing them it arrives on the next one's
//    (3 + (w + 1) % CONSUMERS; with two, 4 - w), so one warpgroup's softmax runs under the
//    others' GEMMs. Every warpgroup of a block walks the same tiles with the same key-tile count
//    (n_tiles is per tile, not per warpgroup), so all take the same number N of turns: barrier
//    3 + w (w > 0) sees N arrivals from warpgroup w - 1 and N syncs of w. Warpgroup 0 pre-arrives
//    once on its own barrier to go first and syncs once more at the very end (taking the last
//    arrival of warpgroup CONSUMERS - 1), so barrier 3 sees N + 1 of each too and every barrier is
//    balanced when the block exits. A warpgroup cannot arrive twice on a barrier before its owner
//    has synced: its next arrival needs its own next turn, which needs the whole ring to go round.
//  * K and V have their own empty barriers: a K stage is released as soon as its S GEMM is done,
//    a V stage when its PV GEMM is done, so the producer refills K early (the intra-warpgroup
//    overlap otherwise leaves the ring almost no slack with two stages).
//  * Q has one full/empty barrier pair per consumer warpgroup (64 rows each); warp 1 of the
//    producer warpgroup loads Q, warp 0 streams K and V, each over the block's whole tile list.
//  * Softmax: scores stay raw; the row max is taken on raw scores (of -s for a negative scale) and
//    exp2(s * scale_log2 - max) is one FFMA + one MUFU per element; masked tiles take the
//    prescaled path. O is rescaled only when some row of the warp changed its max.
//  * Epilogue (epilogue_tma_store): O / l is staged in the warpgroup's own Q part and written by a
//    TMA store; the Q part goes back to the producer once the store has read it. Against 4-byte
//    stores straight from registers (which wasted half of every 32-byte sector), H200: D=256 +3-5%
//    at L=4k and 16k, D=128 4k causal +2%, the rest within noise (bench/NOTES.md).
//  * Deferred tile end (Plan::kDeferEnd: two consumers, where a Q-sized O staging buffer fits in
//    227 KB: D=64 at 128x4, D=128 at 128x2): Q part w goes back after the tile's last S product;
//    the tile's last PV product waits and is issued in the next tile's first turn, beside its
//    first S product (a stand-in product on the K stage, result dropped, where none waits: a
//    wgmma under a runtime branch makes ptxas serialise them all, C7520), and its epilogue
//    follows that turn's softmax, staged in the O buffer. A tile with no key, and the block's
//    last tile, flush it. So the tensor cores get the next tile's first product while a tile
//    ends. H200, interleaved A/B against the plain end: L=1k D=128 +4% full / +6% causal, D=64
//    causal +9%; L=2k D=64 causal +5%; L=4k D=128 within 1-2% either way (bench/NOTES.md).

template <int BN>
__device__ __forceinline__ void softmax_fast(float (&sc)[BN / 2], bool need_mask, int key0, int Lk, int causal,
                                             int diag, int r_lo, int t4, float scale_log2,
                                             float& m_lo, float& m_hi, float& l_lo, float& l_hi,
                                             float& corr_lo, float& corr_hi) {
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
    if (need_mask) {
        const int r_hi = r_lo + 8;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = key0 + 8 * j + 2 * t4 + (e & 1);
                const int row = e < 2 ? r_lo : r_hi;
                const bool hide = col >= Lk || (causal && col - row > diag);
                sc[4 * j + e] = hide ? -INFINITY : sc[4 * j + e] * scale_log2;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(sc[4 * j + 0], sc[4 * j + 1]));
            mx_hi = fmaxf(mx_hi, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
        }
    } else if (scale_log2 >= 0.f) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            mx_lo = fmaxf(mx_lo, fmaxf(sc[4 * j + 0], sc[4 * j + 1]));
            mx_hi = fmaxf(mx_hi, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
        }
        mx_lo *= scale_log2;    // a positive factor commutes with max exactly
        mx_hi *= scale_log2;
    } else {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            mx_lo = fmaxf(mx_lo, fmaxf(-sc[4 * j + 0], -sc[4 * j + 1]));
            mx_hi = fmaxf(mx_hi, fmaxf(-sc[4 * j + 2], -sc[4 * j + 3]));
        }
        mx_lo *= -scale_log2;   // max(-s) * |c| = max(s * c) for c < 0
        mx_hi *= -scale_log2;
    }
    mx_lo = quad_max(mx_lo);
    mx_hi = quad_max(mx_hi);
    const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
    const float use_lo = new_lo == -INFINITY ? 0.f : new_lo;   // never (-inf) - (-inf)
    const float use_hi = new_hi == -INFINITY ? 0.f : new_hi;
    corr_lo = cupyattn::fast_exp2(m_lo - use_lo);   // exactly 1 when the max did not change
    corr_hi = cupyattn::fast_exp2(m_hi - use_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    const float k = need_mask ? 1.f : scale_log2;   // the masked path is already scaled
    const float nu_lo = -use_lo, nu_hi = -use_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        sc[4 * j + 0] = cupyattn::fast_exp2(fmaf(sc[4 * j + 0], k, nu_lo));
        sc[4 * j + 1] = cupyattn::fast_exp2(fmaf(sc[4 * j + 1], k, nu_lo));
        sc[4 * j + 2] = cupyattn::fast_exp2(fmaf(sc[4 * j + 2], k, nu_hi));
        sc[4 * j + 3] = cupyattn::fast_exp2(fmaf(sc[4 * j + 3], k, nu_hi));
        sum_lo += sc[4 * j + 0] + sc[4 * j + 1];
        sum_hi += sc[4 * j + 2] + sc[4 * j + 3];
    }
    l_lo = l_lo * corr_lo + sum_lo;
    l_hi = l_hi * corr_hi + sum_hi;
}

// Rescales O unless every row of this warp kept its max (corr == 1 exactly).
template <int D>
__device__ __forceinline__ void rescale_if_needed(float (&o)[D / 2], float corr_lo, float corr_hi) {
    if (__any_sync(0xffffffffu, (corr_lo != 1.f) | (corr_hi != 1.f))) rescale<D>(o, corr_lo, corr_hi);
}

// Hands tile indices from the drawing thread (the K/V producer) to the Q loader thread and the
// 4 * CONSUMERS consumer warps: kSlots slots, each an int with a full and an empty mbarrier; as
// many slots as the deepest K/V ring, so that the producer can run that many (one-key-tile) tiles
// ahead. Each side counts the entries it has passed (n): entry n uses slot n % kSlots, in fill
// n / kSlots of that slot (one counter instead of a RingPos: the consumers are one register short
// at D=128, BN=176).
template <int CONSUMERS>
struct TileQueue {
    static constexpr unsigned kSlots = 4;
    static constexpr unsigned kBytes = 20 * kSlots;  // full[kSlots], empty[kSlots], value[kSlots]
    static constexpr unsigned kReaders = 1 + 4 * CONSUMERS;   // Q loader thread + one lane per consumer warp
    unsigned base;                                  // kOffQueue
    __device__ unsigned full(unsigned n) const { return base + 8u * (n % kSlots); }
    __device__ unsigned empty(unsigned n) const { return base + 8u * kSlots + 8u * (n % kSlots); }
    __device__ unsigned slot(unsigned n) const { return base + 16u * kSlots + 4u * (n % kSlots); }
    __device__ static unsigned parity(unsigned n) { return (n / kSlots) & 1u; }
    __device__ void init() const {
        for (unsigned s = 0; s < kSlots; ++s) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), kReaders);
        }
    }
    // drawing thread: waits until every reader has taken the entry that used the slot last
    __device__ void push(unsigned& n, int tile) const {
        mbar_wait(empty(n), parity(n) ^ 1u);
        asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(slot(n)), "r"(tile) : "memory");
        mbar_arrive(full(n));   // release: the store is visible to whoever sees the phase flip
        ++n;
    }
    // a reader: the next entry; the slot is handed back by one arrival per reader (a lone thread,
    // or lane 0 of a whole warp). A whole warp gets the value through a shuffle from lane 0: the
    // compiler then knows it is warp-uniform and keeps the tile's loop bounds and shared-memory
    // addresses in uniform registers, as wgmma descriptors need (read straight from shared
    // memory, each wgmma paid an R2UR: ~6% slower, H100). Only lane 0 reads the slot: a read by
    // a lane that does not arrive is, to compute-sanitizer's racecheck, unordered with the
    // producer's next store to the slot (harmless, its value was dropped, but reported).
    __device__ int pop(unsigned& n, bool whole_warp) const {
        mbar_wait(full(n), parity(n));
        int tile = 0;
        if (!whole_warp || (threadIdx.x & 31) == 0)
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(tile) : "r"(slot(n)) : "memory");
        if (whole_warp) {
            tile = __shfl_sync(0xffffffffu, tile, 0);
            if ((threadIdx.x & 31) == 0) mbar_arrive(empty(n));
        } else {
            mbar_arrive(empty(n));
        }
        ++n;
        return tile;
    }
};

// The dynamic scheduler's draw: the number of the next tile nobody has taken is gridDim.x plus
// the returned value (see the kernel's comment). Issued early; its result is read in next_tile.
__device__ __forceinline__ int draw_tile(int* sched) {
    return sched == nullptr ? 0 : atomicAdd(sched, 1);
}

// The tile after `tile` for this block, given the draw made for it. With the dynamic scheduler a
// block that draws past the end counts itself out; the last one out resets the two counters.
__device__ __forceinline__ int next_tile(int tile, int drawn, int* sched, int num_tiles) {
    if (sched == nullptr) return tile + static_cast<int>(gridDim.x);
    const int next = static_cast<int>(gridDim.x) + drawn;
    if (next >= num_tiles) {
        __threadfence();   // this block's last draw lands before its count-out
        // the count's address formed here: hoisted out of the producer's loop, it took two of
        // the producer's registers (spilled at 24)
        int* count = sched;
        asm volatile("" : "+l"(count));
        if (atomicAdd(count + 1, 1) == static_cast<int>(gridDim.x) - 1) {
            __threadfence();
            sched[0] = 0;   // every block has drawn its last: nobody touches the counters again
            sched[1] = 0;
        }
    }
    return next;
}

struct TileInfo {
    int m_block, bh, h, b1, b0, hk, row0, n_tiles;
};

template <int BN, int BLOCK_M>
__device__ __forceinline__ TileInfo decode_tile(int tile, int Lq, int Lk, int Hq, int group, int nb1,
                                                int num_m_blocks, int num_bh, int swz_bh, int causal) {
    TileInfo t;
    const int per_group = swz_bh * num_m_blocks;
    const int grp = tile / per_group;
    const int rem = tile - grp * per_group;
    const int gsize = min(swz_bh, num_bh - grp * swz_bh);
    t.m_block = num_m_blocks - 1 - rem / gsize;
    t.bh = grp * swz_bh + rem % gsize;
    t.h = t.bh % Hq;
    const int bb = t.bh / Hq;
    t.b1 = bb % nb1;
    t.b0 = bb / nb1;
    t.hk = t.h / group;
    t.row0 = t.m_block * BLOCK_M;
    // int32 throughout: Lq, Lk < 2^31 - 1024 (the host checks), so row0 + BLOCK_M <= Lq + 191,
    // (last_row_end - Lq) + Lk lies in (-2^31, Lk] and k_end + BN - 1 < 2^31. In 64 bits the
    // difference Lk - Lq took two registers across the producer's loop (it spilled at 24 registers).
    int k_end = Lk;
    if (causal) {
        const int last_row_end = min(t.row0 + BLOCK_M, Lq);
        k_end = min(k_end, (last_row_end - Lq) + Lk);
    }
    t.n_tiles = k_end > 0 ? (k_end + BN - 1) / BN : 0;
    return t;
}

// threadIdx.x read afresh (a volatile asm is never merged with an earlier read): the consumers of
// D=128, BN=176 have no register to keep their thread index across the key loop (ptxas spilled it).
__device__ __forceinline__ int fresh_tid_x() {
    unsigned x;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(x));
    return static_cast<int>(x);
}

// The epilogue through shared memory, for one consumer warpgroup (thread tw of 128) whose last wgmma
// has completed (so nothing reads its Q part any more: an S GEMM completed before the last PV
// GEMM was issued, and wgmma completion is followed by an implicit generic-async proxy fence).
// `stage` is the warpgroup's Q part (kOwnStaging false), or its part of the O staging buffer of
// the deferred tile end (true: thread 0 first waits until the previous tile's store has read it,
// behind the named barrier; there is no Q part to hand back, the caller released it already).
//  1. O / l as T into stage, in the Q map's layout: D/64 column chunks of 64 rows x 128 bytes, chunk
//     c at stage + c * 8192 (1024-aligned), row r at r * 128, 16-byte unit u (columns 8u..8u+7 of
//     the chunk) at ((u ^ (r % 8)) * 16), i.e. the TMA 128B swizzle. One stmatrix.x4 per 16
//     columns: matrices 0 / 1 are rows g / g+8 of the warp's 16 (accumulator chunk j = 2i), 2 / 3
//     the same rows at j = 2i+1, and the registers are exactly the accumulator pairs (row g: o[4j],
//     o[4j+1]; row g+8: o[4j+2], o[4j+3]). Lane 8m+r addresses row r of matrix m: row 16 warp +
//     8 (m & 1) + r, unit 2 (i % 4) + (m >> 1), which the swizzle turns into (2 (i % 4)) ^ ((m >> 1) ^ r)
//     since 2 (i % 4) is even. The 8 rows of a matrix have 8 different r = row % 8, so their 16-byte
//     units fall in 8 different 16-byte bank groups: each matrix is one conflict-free 128-byte wavefront.
//  2. Every thread fences its writes for the async proxy, the warpgroup syncs on its own named
//     barrier (epi_bar, 128 threads), and thread 0 stores the D/64 chunks with TMA (rows past Lq
//     are clipped by the map) and, staging in the Q part, waits until they have been READ
//     (wait_group.read).
//  3. Staging in the Q part, every thread arrives on its empty barrier (count 128): thread 0 only
//     after that wait, so the producer cannot refill it before the store has read it. The global writes may
//     still be in flight; thread 0 waits for them (bulk_wait_group<0>) before the block exits.
//  lse: a plain global store per row, as before. The named barrier waits for the slowest warp of
//  the warpgroup once per tile; thread 0's warp waits for the store's read (64 x D x 2 bytes).
template <typename T, int D, bool kOwnStaging>
__device__ __forceinline__ void epilogue_tma_store(const float (&o)[D / 2], float l_lo, float l_hi, float m_lo,
                                                   float m_hi, int bh, int r_lo, int Lq, int Hq, int nb1,
                                                   float* __restrict__ lse_out, unsigned stage,
                                                   const TmaMap* tm_o, int epi_bar, unsigned q_empty) {
    const int tw = fresh_tid_x() & 127;   // the thread in the warpgroup
    const int warp = tw >> 5, lane = tw & 31, t4 = lane & 3;
    const int r_hi = r_lo + 8;
    // the store's (h, b1, b0) again from bh, which the loop kept anyway (D=128 at BN=176 has no
    // register to spare across the key loop); decoded up front, where its latency hides under the
    // row sums and the shared-memory writes instead of delaying the store after the barrier
    int h = bh % Hq, bb = bh / Hq, b1 = bb % nb1, b0 = bb / nb1;
    asm volatile("" : "+r"(h), "+r"(b1), "+r"(b0));   // computed here, not sunk into thread 0's branch
    l_lo = quad_sum(l_lo);
    l_hi = quad_sum(l_hi);
    const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
    const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
    if (kOwnStaging) {   // the previous tile's store must have read the staging part
        if (tw == 0) bulk_wait_group_read<0>();
        named_bar_sync(epi_bar, 128);
    }
    {
        const int mat = lane >> 3, r8 = lane & 7;
        const unsigned row_addr = stage + static_cast<unsigned>(warp * 16 + (mat & 1) * 8 + r8) * 128u;
        const unsigned unit = static_cast<unsigned>((mat >> 1) ^ r8) << 4;
#pragma unroll
        for (int i = 0; i < D / 16; ++i)
            stmatrix_x4(row_addr + (i / 4) * (64u * 128u) + (unit ^ ((i % 4) * 32u)),
                        pack2<T>(o[8 * i + 0] * inv_lo, o[8 * i + 1] * inv_lo),
                        pack2<T>(o[8 * i + 2] * inv_hi, o[8 * i + 3] * inv_hi),
                        pack2<T>(o[8 * i + 4] * inv_lo, o[8 * i + 5] * inv_lo),
                        pack2<T>(o[8 * i + 6] * inv_hi, o[8 * i + 7] * inv_hi));
    }
    fence_proxy_async_shared();
    named_bar_sync(epi_bar, 128);
    if (tw == 0) {
#pragma unroll
        for (int c = 0; c < D / 64; ++c)
            tma_store_5d(tm_o, stage + c * (64u * 128u), c * 64, r_lo, h, b1, b0);   // thread 0: r_lo = first row
        bulk_commit_group();
        if (!kOwnStaging) bulk_wait_group_read<0>();
    }
    if (!kOwnStaging) mbar_arrive(q_empty);   // the Q part was the staging part
    const long long row_base = static_cast<long long>(bh) * Lq;
    if (t4 == 0 && r_lo < Lq) lse_out[row_base + r_lo] = l_lo > 0.f ? (m_lo + cupyattn::fast_log2(l_lo)) * kLn2 : -INFINITY;
    if (t4 == 0 && r_hi < Lq) lse_out[row_base + r_hi] = l_hi > 0.f ? (m_hi + cupyattn::fast_log2(l_hi)) * kLn2 : -INFINITY;
}

template <typename T, int D, int BN, int STAGES, int CONSUMERS>
__device__ __forceinline__ void pingpong_body(const TmaMap& tm_q, const TmaMap& tm_k, const TmaMap& tm_v,
                                              T* __restrict__ out, float* __restrict__ lse_out, int Lq, int Lk,
                                              int Hq, int group, int nb1, int num_m_blocks, int num_bh,
                                              int swz_bh, int causal, int bcast, float scale_log2, int num_tiles,
                                              int* sched, const TmaMap& tm_o) {
    using P = Plan<D, BN, STAGES, CONSUMERS>;
    using R = Roles<CONSUMERS>;
    extern __shared__ unsigned char smem_raw[];
    const unsigned raw_addr = smem_u32(smem_raw);
    const unsigned base = (raw_addr + 1023u) & ~1023u;
    const unsigned sQ = base, sK = base + P::kOffK, sV = base + P::kOffV;
    const unsigned bars = base + P::kOffBar;
    constexpr int C = CONSUMERS;
    auto bar_q = [&](int w) { return bars + 8u * w; };                       // Q part w loaded
    auto bar_q_empty = [&](int w) { return bars + 8u * (C + w); };           // Q part w free
    auto bar_full_k = [&](int s) { return bars + 8u * (2 * C + s); };
    auto bar_full_v = [&](int s) { return bars + 8u * (2 * C + STAGES + s); };
    auto bar_empty_k = [&](int s) { return bars + 8u * (2 * C + 2 * STAGES + s); };
    auto bar_empty_v = [&](int s) { return bars + 8u * (2 * C + 3 * STAGES + s); };
    const TileQueue<CONSUMERS> queue{base + P::kOffQueue};

    if (threadIdx.x == 0) {
#pragma unroll
        for (int w = 0; w < C; ++w) {
            mbar_init(bar_q(w), 1);
            mbar_init(bar_q_empty(w), 128);
        }
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bar_full_k(s), 1);
            mbar_init(bar_full_v(s), 1);
            mbar_init(bar_empty_k(s), C * 128);
            mbar_init(bar_empty_v(s), C * 128);
        }
        queue.init();
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        // =========================== producer warpgroup ===========================================
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(R::kProducerRegs));
        const int pw = threadIdx.x >> 5;
        if (pw == 0 && (threadIdx.x & 31) == 0) {
            // Draws the tiles (queue) and streams K and V: one ring position per key tile, over
            // all tiles of this block.
            tma_prefetch_map(&tm_k);
            tma_prefetch_map(&tm_v);
            // ring position as one count of key tiles issued (stage = count % STAGES, phase =
            // (count / STAGES) & 1) and the key tiles left as one down-count: a register each
            unsigned issued = 0;
            unsigned queued = 0;
#pragma unroll 1
            for (int tile = blockIdx.x;;) {
                queue.push(queued, tile);
                if (tile >= num_tiles) break;
                const int drawn = draw_tile(sched);   // in flight while this tile's loads go out
                const TileInfo t = decode_tile<BN, R::kBlockM>(tile, Lq, Lk, Hq, group, nb1, num_m_blocks, num_bh, swz_bh, causal);
#pragma unroll 1
                for (int left = t.n_tiles; left > 0; --left, ++issued) {
                    const int s = static_cast<int>(issued % STAGES);
                    const unsigned phase = (issued / STAGES) & 1u;
                    const int key0 = (left - 1) * BN;
                    // K's and V's coordinates picked here from the tile's three: hoisted out of the
                    // loop they took six registers, and the producer has 24
                    int hk = t.hk, b1 = t.b1, b0 = t.b0;
                    asm volatile("" : "+r"(hk), "+r"(b1), "+r"(b0));
                    const int kh = (bcast & 8) ? 0 : hk, kb1 = (bcast & 16) ? 0 : b1, kb0 = (bcast & 32) ? 0 : b0;
                    const int vh = (bcast & 64) ? 0 : hk, vb1 = (bcast & 128) ? 0 : b1, vb0 = (bcast & 256) ? 0 : b0;
                    mbar_wait(bar_empty_k(s), phase ^ 1u);
                    mbar_arrive_expect_tx(bar_full_k(s), P::kKV);
#pragma unroll
                    for (int c = 0; c < static_cast<int>(P::kChunks); ++c)
                        tma_load_5d(sK + s * P::kKV + c * (BN * 128u), &tm_k, bar_full_k(s), c * 64, key0, kh, kb1, kb0);
                    mbar_wait(bar_empty_v(s), phase ^ 1u);
                    mbar_arrive_expect_tx(bar_full_v(s), P::kKV);
#pragma unroll
                    for (int c = 0; c < static_cast<int>(P::kChunks); ++c)
                        tma_load_5d(sV + s * P::kKV + c * (BN * 128u), &tm_v, bar_full_v(s), c * 64, key0, vh, vb1, vb0);
                }
                tile = next_tile(tile, drawn, sched, num_tiles);
            }
        } else if (pw == 1 && (threadIdx.x & 31) == 0) {
            // Loads Q: the 64-row part of every consumer warpgroup of every tile, each when its
            // warpgroup freed it. A tile whose rows see no key (causal, Lq > Lk) gets the same
            // handshake with no bytes, so the Q barriers' phases follow the queue's entry count.
            tma_prefetch_map(&tm_q);
            unsigned queued = 0;
#pragma unroll 1
            for (;;) {
                const unsigned parity = queued & 1u;
                const int tile = queue.pop(queued, false);
                if (tile >= num_tiles) break;
                const TileInfo t = decode_tile<BN, R::kBlockM>(tile, Lq, Lk, Hq, group, nb1, num_m_blocks, num_bh, swz_bh, causal);
                const int qh = (bcast & 1) ? 0 : t.h, qb1 = (bcast & 2) ? 0 : t.b1, qb0 = (bcast & 4) ? 0 : t.b0;
#pragma unroll
                for (int w = 0; w < C; ++w) {
                    mbar_wait(bar_q_empty(w), parity ^ 1u);
                    if (t.n_tiles == 0) {
                        mbar_arrive(bar_q(w));
                        continue;
                    }
                    mbar_arrive_expect_tx(bar_q(w), P::kQPart);
#pragma unroll
                    for (int c = 0; c < static_cast<int>(P::kChunks); ++c)
                        tma_load_5d(sQ + w * P::kQPart + c * (64u * 128u), &tm_q, bar_q(w),
                                    c * 64, t.row0 + w * 64, qh, qb1, qb0);
                }
            }
        }
    } else {
        // =========================== consumer warpgroups ==========================================
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(R::kConsumerRegs));
        const int ct = static_cast<int>(threadIdx.x) - 128;
        const int w = ct >> 7;                  // which consumer warpgroup (0 .. C-1)
        const int tw = ct & 127;
        const int warp = tw >> 5, lane = tw & 31;
        const int g = lane >> 2, t4 = lane & 3;
        // At D <= 128 through a shuffle from lane 0, so that the compiler knows it is warp-uniform:
        // then every wgmma descriptor of the key loop lives in uniform registers (sm_90a SASS: no
        // R2UR in the loop, against two before each S wgmma; H200: D=128 L=16k 176x2 +2-3%). At
        // D=256 the same change measured 4% slower at L=16k, so it keeps the plain sum there.
        const unsigned sQw_sum = sQ + w * P::kQPart;
        const unsigned sQw = D <= 128 ? __shfl_sync(0xffffffffu, sQw_sum, 0) : sQw_sum;
        const int diag = Lk - Lq;               // key j visible to row i iff j - i <= diag (causal)
        // tensor-core turns, round robin: wait on my_bar, issue, arrive on the next one's
        const int my_bar = 3 + w, next_bar = C == 2 ? 4 - w : (w + 1 == C ? 3 : 4 + w);
        if (w == 0) named_bar_arrive(3, 256);   // warpgroup 0 issues first
        if (tw == 0) tma_prefetch_map(&tm_o);

        constexpr bool kDefer = P::kDeferEnd;
        const unsigned sOw = base + P::kOffO + w * P::kQPart;   // the O staging part (kDefer)
        // kDefer: the last PV product of the previous tile, still to issue, and what its
        // epilogue needs; o holds that tile's sum until then
        bool pending = false;
        RingPos pend_pos;
        float pm_lo = 0.f, pm_hi = 0.f, pl_lo = 0.f, pl_hi = 0.f;
        int p_bh = 0, p_r_lo = 0;
        float o[D / 2];
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 16; ++i) pa[i][0] = pa[i][1] = pa[i][2] = pa[i][3] = 0u;
        // kDefer: the pending tile's last PV product off-turn, then its epilogue (a tile with no
        // key, or the block's last tile, has no first turn to take it)
        auto flush_pending = [&]() {
            mbar_wait(bar_full_v(pend_pos.stage), pend_pos.phase);
            fence_regs(o);
            wgmma_fence();
            issue_pv<T, D, BN>(o, pa, __shfl_sync(0xffffffffu, sV + pend_pos.stage * P::kKV, 0));
            wgmma_commit();
            wgmma_wait<0>();
            fence_regs(o);
            mbar_arrive(bar_empty_v(pend_pos.stage));
            epilogue_tma_store<T, D, true>(o, pl_lo, pl_hi, pm_lo, pm_hi, p_bh, p_r_lo, Lq, Hq, nb1, lse_out, sOw,
                                           &tm_o, 3 + C + w, 0u);
            pending = false;
        };

        RingPos pos;
        unsigned queued = 0;
#pragma unroll 1
        for (;;) {
            const int tile = queue.pop(queued, true);
            if (tile >= num_tiles) break;
            const TileInfo t = decode_tile<BN, R::kBlockM>(tile, Lq, Lk, Hq, group, nb1, num_m_blocks, num_bh, swz_bh, causal);
            const int n_tiles = t.n_tiles;
            const int wrow0 = t.row0 + w * 64;
            const int r_lo = wrow0 + warp * 16 + g;
            // does key tile it (visited from the last) need the Lk / causal mask for this warpgroup?
            auto needs_mask = [&](int key0) {
                const long long last_col = static_cast<long long>(key0) + BN - 1;
                return last_col >= Lk || (causal && last_col - wrow0 > diag);
            };

            if (!kDefer) {
#pragma unroll
                for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
            }
            float m_lo = -INFINITY, m_hi = -INFINITY;
            float l_lo = 0.f, l_hi = 0.f;

            mbar_wait(bar_q(w), (queued - 1u) & 1u);   // this tile's Q (the queue's entry queued - 1)
            if (kDefer) {   // once a tile, through lane 0: the branches on `pending` hide that these are uniform
                pending = __shfl_sync(0xffffffffu, pending, 0);
                pos.stage = __shfl_sync(0xffffffffu, pos.stage, 0);
                pos.phase = __shfl_sync(0xffffffffu, pos.phase, 0);
                pend_pos.stage = __shfl_sync(0xffffffffu, pend_pos.stage, 0);
            }
            if (n_tiles > 0) {
                float sc[BN / 2];
                float corr_lo, corr_hi;
                // tile 0: S GEMM and softmax, and under kDefer the previous tile's last PV
                // product (or, with none pending, a stand-in whose result is dropped: a wgmma
                // under a runtime branch would make ptxas serialise every wgmma, C7520)
                {
                    const int s = pos.stage;
                    const unsigned pv_stage = __shfl_sync(0xffffffffu, pending ? sV + pend_pos.stage * P::kKV : sK + s * P::kKV, 0);
                    const int key0 = (n_tiles - 1) * BN;
                    mbar_wait(bar_full_k(s), pos.phase);
                    if (kDefer && pending) mbar_wait(bar_full_v(pend_pos.stage), pend_pos.phase);
                    named_bar_sync(my_bar, 256);
                    if (kDefer) fence_regs(o);
                    wgmma_fence();
                    issue_qk<T, D, BN>(sc, sQw, sK + s * P::kKV);
                    wgmma_commit();
                    if (kDefer) {
                        issue_pv<T, D, BN>(o, pa, pv_stage);
                        wgmma_commit();
                    }
                    named_bar_arrive(next_bar, 256);
                    if (kDefer) wgmma_wait<1>(); else wgmma_wait<0>();
                    fence_regs(sc);
                    if (!kDefer) mbar_arrive(bar_empty_k(s));
                    if (kDefer && n_tiles == 1) mbar_arrive(bar_q_empty(w));   // Q's last product done
                    softmax_fast<BN>(sc, needs_mask(key0), key0, Lk, causal, diag, r_lo, t4, scale_log2,
                                     m_lo, m_hi, l_lo, l_hi, corr_lo, corr_hi);
                    if (kDefer) {
                        wgmma_wait<0>();
                        fence_regs(o);
                        mbar_arrive(bar_empty_k(s));   // after the stand-in too, which may read it
                        if (pending) {
                            mbar_arrive(bar_empty_v(pend_pos.stage));
                            epilogue_tma_store<T, D, true>(o, pl_lo, pl_hi, pm_lo, pm_hi, p_bh, p_r_lo, Lq, Hq, nb1,
                                                           lse_out, sOw, &tm_o, 3 + C + w, 0u);
                            pending = false;
                        }
#pragma unroll
                        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
                    }
                    to_a_frags<T, BN>(sc, pa);
                }
                RingPos prev = pos;
                pos.advance<STAGES>();
#pragma unroll 1
                for (int it = 1; it < n_tiles; ++it) {
                    const int s = pos.stage, sp = prev.stage;
                    const int key0 = (n_tiles - 1 - it) * BN;
                    mbar_wait(bar_full_k(s), pos.phase);
                    mbar_wait(bar_full_v(sp), prev.phase);
                    named_bar_sync(my_bar, 256);
                    fence_regs(o);
                    wgmma_fence();
                    issue_qk<T, D, BN>(sc, sQw, sK + s * P::kKV);    // group 1: S_i
                    wgmma_commit();
                    issue_pv<T, D, BN>(o, pa, sV + sp * P::kKV);    // group 2: O += P_{i-1} V_{i-1}
                    wgmma_commit();
                    named_bar_arrive(next_bar, 256);
                    wgmma_wait<1>();                                // S_i done, PV may still run
                    fence_regs(sc);
                    mbar_arrive(bar_empty_k(s));
                    // kDefer: Q's last product is done, so the loader may bring the next tile's
                    // Q while this one ends
                    if (kDefer && it == n_tiles - 1) mbar_arrive(bar_q_empty(w));
                    softmax_fast<BN>(sc, needs_mask(key0), key0, Lk, causal, diag, r_lo, t4, scale_log2,
                                     m_lo, m_hi, l_lo, l_hi, corr_lo, corr_hi);
                    wgmma_wait<0>();                                // PV_{i-1} done: pa, o free
                    fence_regs(o);
                    mbar_arrive(bar_empty_v(sp));
                    rescale_if_needed<D>(o, corr_lo, corr_hi);
                    to_a_frags<T, BN>(sc, pa);
                    prev = pos;
                    pos.advance<STAGES>();
                }
                if (kDefer) {   // the last PV product waits for the next tile's first turn
                    pending = true;
                    pend_pos = prev;
                    pm_lo = m_lo, pm_hi = m_hi, pl_lo = l_lo, pl_hi = l_hi;
                    p_bh = t.bh, p_r_lo = r_lo;
                } else {
                    mbar_wait(bar_full_v(prev.stage), prev.phase);
                    fence_regs(o);
                    wgmma_fence();
                    issue_pv<T, D, BN>(o, pa, sV + prev.stage * P::kKV);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs(o);
                    mbar_arrive(bar_empty_v(prev.stage));
                }
            }
            // Named barriers 3 + C + w: 0 is __syncthreads, 3 .. 2 + C the tensor-core turns.
            if (!kDefer) {
                // Q part w is released inside, once the TMA store has read it.
                epilogue_tma_store<T, D, false>(o, l_lo, l_hi, m_lo, m_hi, t.bh, r_lo, Lq, Hq, nb1, lse_out, sQw,
                                                &tm_o, 3 + C + w, bar_q_empty(w));
            } else if (n_tiles == 0) {   // no key: zeros and lse -inf, after the pending tile
                mbar_arrive(bar_q_empty(w));
                if (pending) flush_pending();
#pragma unroll
                for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
                epilogue_tma_store<T, D, true>(o, l_lo, l_hi, m_lo, m_hi, t.bh, r_lo, Lq, Hq, nb1, lse_out, sOw,
                                               &tm_o, 3 + C + w, 0u);
            }
        }
        if (kDefer && pending) flush_pending();
        if ((fresh_tid_x() & 127) == 0) bulk_wait_group<0>();   // its TMA stores have reached global memory
        if (w == 0) named_bar_sync(3, 256);   // takes warpgroup C-1's last arrival: every barrier balanced
    }
}

}  // namespace sm90

// ---------------------------------------------------------------------------------------------
// The kernel. Tiles (m-block, batch*q-head) are numbered with (a) groups of swz_bh consecutive
// (batch, head) pairs kept together for L2 reuse of K/V and (b) inside a group the m-blocks from
// the last (heaviest under causal) to the first; blocks take them in that order (see the top).
//
// Tensor maps are 5-D, innermost first: (D, L, H, B1, B0). A dimension that is broadcast (stride
// 0) has extent 1 in the map and its coordinate forced to 0 by `bcast` (bits 0-2: q's H, B1, B0;
// 3-5: k's; 6-8: v's). out is contiguous (B0, B1, Hq, Lq, D); lse (B0, B1, Hq, Lq) float32.
// tm_o (last, so that tools/ab_sm90.py can pass it to sources from before it) maps out the same
// way, never broadcast, with a 64 x 64 box; the epilogue writes O through it, so `out` itself is
// not read here (it stays in its place in the argument list, which older sources take).
template <typename T, int D, int BN, int STAGES, int CONSUMERS = 2>
__global__ void __launch_bounds__(sm90::Roles<CONSUMERS>::kThreads, 1)
flash_fwd_sm90_kernel(const __grid_constant__ sm90::TmaMap tm_q, const __grid_constant__ sm90::TmaMap tm_k,
                      const __grid_constant__ sm90::TmaMap tm_v, T* __restrict__ out,
                      float* __restrict__ lse_out, int Lq, int Lk, int Hq, int group, int nb1,
                      int num_m_blocks, int num_bh, int swz_bh, int causal, int bcast, float scale_log2,
                      int num_tiles, int* __restrict__ sched, const __grid_constant__ sm90::TmaMap tm_o) {
    using namespace sm90;
    static_assert(D % 64 == 0 && D >= 64 && D <= 256, "head dim: 64, 128, 192 or 256");
    static_assert(CONSUMERS == 2 || D == 64, "3 consumer warpgroups: 160 registers hold a D=64 tile only");
    static_assert(BN % 16 == 0 && BN >= 16 && BN <= 256, "key tile");
    static_assert(Plan<D, BN, STAGES, CONSUMERS>::kBytes <= 227 * 1024, "shared memory");
    static_assert(TileQueue<CONSUMERS>::kBytes == 80 && STAGES <= static_cast<int>(TileQueue<CONSUMERS>::kSlots),
                  "Plan reserves 80 bytes for the tile queue, whose slots cover the K/V ring");
    pingpong_body<T, D, BN, STAGES, CONSUMERS>(tm_q, tm_k, tm_v, out, lse_out, Lq, Lk, Hq, group, nb1, num_m_blocks,
                                    num_bh, swz_bh, causal, bcast, scale_log2, num_tiles, sched, tm_o);
}
