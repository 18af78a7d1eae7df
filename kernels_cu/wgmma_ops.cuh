// wgmma.mma_async m64nNk16 wrappers for one 16-bit input type, included by hopper.cuh once per
// type with WGMMA_T (the C++ type) and WGMMA_TY (its PTX name, "f16" or "bf16") defined; the
// instruction text differs between the types only in that name. No include guard on purpose
// (the operand-list macros below have one).
//
// Wgmma<T, N>::ss(): the S-type GEMM, A and B from shared memory, both K-major (no transpose).
// Wgmma<T, N>::rs(): the PV-type GEMM, A from registers (K-major by definition), B from shared
//                    memory MN-major (trans-b = 1).
// WgmmaT<T, N>::ss(): A and B from shared memory, both MN-major (trans-a = trans-b = 1): the
//                    backward's dQ = dS K, with dS stored key-major (dS^T) and K stored with the
//                    head dim contiguous.
// d[N/2]: fp32 accumulators (layout in flash_fwd_sm90.cu); scale_d = 0 overwrites, 1 accumulates.
// N: S-type 64, 128 and the key tiles the tuning tools try (80, 96, 160, 176, 192); PV-type 64,
// 128, 256 (the head dims); WgmmaT 32, 64, 128.
//
// Inline PTX numbers its operands outputs first, so the accumulators are %0 .. %(N/2 - 1) in
// every wrapper and the inputs follow them: each wrapper names its inputs' numbers, and a
// static_assert checks them against N.

#ifndef CUPYATTN_WGMMA_OPERAND_LISTS
#define CUPYATTN_WGMMA_OPERAND_LISTS
// The accumulators in blocks of eight: WGMMA_Tk is block k's "%i" text, WGMMA_Ok its operands
// (every block after the first with a leading comma).
#define WGMMA_T0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define WGMMA_T1 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define WGMMA_T2 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define WGMMA_T3 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_T4 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define WGMMA_T5 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define WGMMA_T6 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define WGMMA_T7 ", %56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_T8 ", %64, %65, %66, %67, %68, %69, %70, %71"
#define WGMMA_T9 ", %72, %73, %74, %75, %76, %77, %78, %79"
#define WGMMA_T10 ", %80, %81, %82, %83, %84, %85, %86, %87"
#define WGMMA_T11 ", %88, %89, %90, %91, %92, %93, %94, %95"
#define WGMMA_T12 ", %96, %97, %98, %99, %100, %101, %102, %103"
#define WGMMA_T13 ", %104, %105, %106, %107, %108, %109, %110, %111"
#define WGMMA_T14 ", %112, %113, %114, %115, %116, %117, %118, %119"
#define WGMMA_T15 ", %120, %121, %122, %123, %124, %125, %126, %127"
#define WGMMA_O0 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define WGMMA_O1 , "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define WGMMA_O2 , "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define WGMMA_O3 , "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WGMMA_O4 , "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define WGMMA_O5 , "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define WGMMA_O6 , "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
#define WGMMA_O7 , "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WGMMA_O8 , "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71])
#define WGMMA_O9 , "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79])
#define WGMMA_O10 , "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
#define WGMMA_O11 , "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
#define WGMMA_O12 , "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103])
#define WGMMA_O13 , "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
#define WGMMA_O14 , "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119])
#define WGMMA_O15 , "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
// WGMMA_TEXT_n / WGMMA_OPS_n: the first n accumulators (n = N / 2 of the wrappers below).
#define WGMMA_TEXT_16 WGMMA_T0 WGMMA_T1
#define WGMMA_OPS_16 WGMMA_O0 WGMMA_O1
#define WGMMA_TEXT_32 WGMMA_TEXT_16 WGMMA_T2 WGMMA_T3
#define WGMMA_OPS_32 WGMMA_OPS_16 WGMMA_O2 WGMMA_O3
#define WGMMA_TEXT_40 WGMMA_TEXT_32 WGMMA_T4
#define WGMMA_OPS_40 WGMMA_OPS_32 WGMMA_O4
#define WGMMA_TEXT_48 WGMMA_TEXT_40 WGMMA_T5
#define WGMMA_OPS_48 WGMMA_OPS_40 WGMMA_O5
#define WGMMA_TEXT_64 WGMMA_TEXT_48 WGMMA_T6 WGMMA_T7
#define WGMMA_OPS_64 WGMMA_OPS_48 WGMMA_O6 WGMMA_O7
#define WGMMA_TEXT_80 WGMMA_TEXT_64 WGMMA_T8 WGMMA_T9
#define WGMMA_OPS_80 WGMMA_OPS_64 WGMMA_O8 WGMMA_O9
#define WGMMA_TEXT_88 WGMMA_TEXT_80 WGMMA_T10
#define WGMMA_OPS_88 WGMMA_OPS_80 WGMMA_O10
#define WGMMA_TEXT_96 WGMMA_TEXT_88 WGMMA_T11
#define WGMMA_OPS_96 WGMMA_OPS_88 WGMMA_O11
#define WGMMA_TEXT_128 WGMMA_TEXT_96 WGMMA_T12 WGMMA_T13 WGMMA_T14 WGMMA_T15
#define WGMMA_OPS_128 WGMMA_OPS_96 WGMMA_O12 WGMMA_O13 WGMMA_O14 WGMMA_O15
// S-type body: accumulators d[ACC], descriptors %DA and %DB, scale_d %SD (= ACC, ACC + 1, ACC + 2);
// TRANS: the transpose flags of A and B ("0, 0": K-major, "1, 1": MN-major).
#define WGMMA_SS(N, ACC, DA, DB, SD, TRANS)                                                                    \
    __device__ __forceinline__ static void ss(float (&d)[ACC], unsigned long long da, unsigned long long db,   \
                                              int scale_d) {                                                  \
        static_assert(N == 2 * ACC && DA == ACC && DB == ACC + 1 && SD == ACC + 2, "operand numbers");         \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #SD ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." WGMMA_TY "." WGMMA_TY " {"             \
                     WGMMA_TEXT_##ACC "}, %" #DA ", %" #DB ", p, 1, 1, " TRANS ";\n}\n"                      \
                     : WGMMA_OPS_##ACC : "l"(da), "l"(db), "r"(scale_d));                                   \
    }
// PV-type body: accumulators d[ACC], A fragment %A0 .. %A0 + 3, descriptor %DB, scale_d %SD.
#define WGMMA_RS(N, ACC, A0, A1, A2, A3, DB, SD)                                                               \
    __device__ __forceinline__ static void rs(float (&d)[ACC], const unsigned (&a)[4], unsigned long long db,   \
                                              int scale_d) {                                                  \
        static_assert(N == 2 * ACC && A0 == ACC && A1 == A0 + 1 && A2 == A0 + 2 && A3 == A0 + 3 &&             \
                      DB == A0 + 4 && SD == A0 + 5, "operand numbers");                                       \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #SD ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." WGMMA_TY "." WGMMA_TY " {"             \
                     WGMMA_TEXT_##ACC "}, {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #DB ", p, 1, 1, 1;\n}\n" \
                     : WGMMA_OPS_##ACC : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));  \
    }
#endif  // CUPYATTN_WGMMA_OPERAND_LISTS

template <> struct Wgmma<WGMMA_T, 64> { WGMMA_SS(64, 32, 32, 33, 34, "0, 0") WGMMA_RS(64, 32, 32, 33, 34, 35, 36, 37) };
template <> struct Wgmma<WGMMA_T, 128> { WGMMA_SS(128, 64, 64, 65, 66, "0, 0") WGMMA_RS(128, 64, 64, 65, 66, 67, 68, 69) };
template <> struct Wgmma<WGMMA_T, 256> { WGMMA_RS(256, 128, 128, 129, 130, 131, 132, 133) };
template <> struct Wgmma<WGMMA_T, 80> { WGMMA_SS(80, 40, 40, 41, 42, "0, 0") };
template <> struct Wgmma<WGMMA_T, 96> { WGMMA_SS(96, 48, 48, 49, 50, "0, 0") };
template <> struct Wgmma<WGMMA_T, 160> { WGMMA_SS(160, 80, 80, 81, 82, "0, 0") };
template <> struct Wgmma<WGMMA_T, 176> { WGMMA_SS(176, 88, 88, 89, 90, "0, 0") };
template <> struct Wgmma<WGMMA_T, 192> { WGMMA_SS(192, 96, 96, 97, 98, "0, 0") };
template <> struct WgmmaT<WGMMA_T, 32> { WGMMA_SS(32, 16, 16, 17, 18, "1, 1") };
template <> struct WgmmaT<WGMMA_T, 64> { WGMMA_SS(64, 32, 32, 33, 34, "1, 1") };
template <> struct WgmmaT<WGMMA_T, 128> { WGMMA_SS(128, 64, 64, 65, 66, "1, 1") };
