// INT4 x int8 matmul with AVX512-VNNI (llama.cpp's q4_0 x q8_0 idea on the checkpoint layout).
//
// Activations: each token row is quantized to int8 per 8 consecutive inputs with an fp32 scale
// (xs = amax/127, q = round(x/xs)); llama.cpp's q8_0 uses 32, but 8 costs the kernel nothing
// (one dpbusd lane = 8 columns) and measured NMSE drops 1.7x (Gaussian x: 2.9e-5 -> 1.7e-5)
// to 2.2x (moe, heavy-tailed SwiGLU outputs: 1.4e-4 -> 6e-5). Weights stay as they are on
// disk: 4-bit codes u = q+8 in int32 words, 8 nibbles LSB-first, so byte k of a 32-column
// group holds column 2k (low nibble) and 2k+1 (high nibble). The activations are stored de-interleaved to match, per block of 128
// columns (4 groups = 64 weight bytes = one zmm load):
//   lo[64]   int8 q of the even columns (byte 16k+j = column 32k+2j of the block)
//   hi[64]   int8 q of the odd columns  (column 32k+2j+1)
//   bias[16] int32, lane 4k+m = -8 * (sum of the 8 q's that lane m of group k multiplies)
//   xs[16]   fp32, lane 4k+m = the activation scale of those 8 columns (32k+8m .. 32k+8m+7)
// so for one row and one token:  dot = dpbusd(dpbusd(bias, w & 0x0F, lo), (w >> 4) & 0x0F, hi)
// holds Σ (u-8)·q for 8 columns per lane (4 lanes per group, exact in int32), and
// acc += float(dot) * xs * ws (ws = the row's bf16 group scale, broadcast to its 4 lanes).
// Each weight byte is loaded once per call: a tile of RB rows is unpacked once and used by up
// to TT tokens held in registers. Results differ from ref only by the int8 rounding of x
// (and ref's bf16 rounding of each weight, ~2e-6): NMSE ~1.7e-5 on Gaussian data.
#include "common.h"
#include <vector>

bool g_exact = false;

#if defined(K2_AVX512) && defined(__AVX512VNNI__)
#define K2_VNNI 1
#endif

bool int4_vnni(int I, int group, bool scales_f32) {
#ifdef K2_VNNI
    return !scales_f32 && !g_exact && I > 0 && I % 32 == 0 && group % 32 == 0 &&
           (128 % group == 0 || group % 128 == 0);
#else
    (void)I; (void)group; (void)scales_f32;
    return false;
#endif
}

#ifdef K2_VNNI
struct alignas(64) Q8Block {
    int8_t lo[64];
    int8_t hi[64];
    int32_t bias[16];
    float xs[16];
};
static_assert(sizeof(Q8Block) == Q8_BLOCK_BYTES, "Q8Block layout");

void int4_quant_x(void* xq, const float* x, int ncols) {
    Q8Block* q = (Q8Block*)xq;
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m512i eight = _mm512_set1_epi8(8);
    const int ng = ncols / 32;
    for (int b = 0; b * 4 < ng; b++) {
        Q8Block& B = q[b];
        const int nk = ng - 4 * b < 4 ? ng - 4 * b : 4;
        std::memset(&B, 0, sizeof(B));
        for (int k = 0; k < nk; k++) {
            const float* xg = x + 128 * b + 32 * k;
            __m512 a = _mm512_loadu_ps(xg), c = _mm512_loadu_ps(xg + 16);
            __m512 e = _mm512_permutex2var_ps(a, ev, c), o = _mm512_permutex2var_ps(a, od, c);
            // 128-bit lane m of e and o = columns 8m..8m+7: one scale per lane (per 8 columns)
            __m512 mx = _mm512_max_ps(_mm512_abs_ps(e), _mm512_abs_ps(o));
            mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0xB1));   // swap neighbours
            mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0x4E));   // swap pairs
            __mmask16 nz = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_GT_OQ);
            __m512 id = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.f), mx);
            __m512 d = _mm512_div_ps(mx, _mm512_set1_ps(127.f));
            _mm_store_ps(B.xs + 4 * k, _mm512_castps512_ps128(_mm512_permutexvar_ps(
                _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), d)));
            _mm_store_si128((__m128i*)(B.lo + 16 * k),
                            _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(e, id))));
            _mm_store_si128((__m128i*)(B.hi + 16 * k),
                            _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(o, id))));
        }
        __m512i l = _mm512_load_si512(B.lo), h = _mm512_load_si512(B.hi);
        __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, l), eight, h);
        _mm512_store_si512(B.bias, _mm512_sub_epi32(_mm512_setzero_si512(), s));
    }
}

// RB rows x TT tokens over all blocks; xt[t] = token t's blocks. sc holds one bf16 scale per
// 32 columns (row stride lds), read a block at a time by block_scales. A partial last block reads
// zero-padded copies of its weight bytes and scales (never past the end of a row).
// One row's 4 bf16 group scales of a 128-column block (one 8-byte load) as fp32 lanes:
// vpshufb moves scale k into the high half of the 4 lanes of 128-bit lane k.
static inline __m512 block_scales(const uint16_t* sp) {
    const __m512i sh = _mm512_set_epi8(
        7, 6, -1, -1, 7, 6, -1, -1, 7, 6, -1, -1, 7, 6, -1, -1,
        5, 4, -1, -1, 5, 4, -1, -1, 5, 4, -1, -1, 5, 4, -1, -1,
        3, 2, -1, -1, 3, 2, -1, -1, 3, 2, -1, -1, 3, 2, -1, -1,
        1, 0, -1, -1, 1, 0, -1, -1, 1, 0, -1, -1, 1, 0, -1, -1);
    int64_t s4;
    std::memcpy(&s4, sp, 8);
    return _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi64(s4), sh));
}

// acc + one block's Σ (u-8)·q · xs · ws for a row's nibbles (lo, hi) and a token's block
// (xl, xh, bias, xs): every kernel below accumulates a (row, token) through this, in block
// order, so their results are bit-identical.
static inline __m512 q8_block_fma(__m512 acc, __m512i lo, __m512i hi, const Q8Block& X, __m512 ws) {
    __m512i d = _mm512_dpbusd_epi32(_mm512_load_si512(X.bias), lo, _mm512_load_si512(X.lo));
    d = _mm512_dpbusd_epi32(d, hi, _mm512_load_si512(X.hi));
    return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_load_ps(X.xs)), ws, acc);
}

template <int RB, int TT, bool PF>
static void q8_tile(float* y, int ldy, const Q8Block* const* xt, int I, const uint8_t* wb,
                    size_t ldw, const uint16_t* sc, size_t lds) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int nfull = I / 128, nb = ceil_div(I, 128);
    // prefetch distance: two row tiles (the same offset in each of their rows), >= 16 KiB
    const size_t PFD = 2 * RB * ldw > 16384 ? 2 * RB * ldw : 16384;
    alignas(64) uint8_t tw[RB][64];
    alignas(8) uint16_t ts[RB][4];
    if (nb > nfull) {
        const int cols = I - 128 * nfull;
        for (int r = 0; r < RB; r++) {
            std::memset(tw[r], 0, 64);
            std::memcpy(tw[r], wb + r * ldw + 64 * (size_t)nfull, cols / 2);
            std::memset(ts[r], 0, 8);
            std::memcpy(ts[r], sc + r * lds + 4 * (size_t)nfull, cols / 32 * 2);
        }
    }
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const bool full = b < nfull;
        __m512i lo[RB], hi[RB];
        __m512 ws[RB];
        for (int r = 0; r < RB; r++) {
            const uint8_t* wp = full ? wb + r * ldw + 64 * (size_t)b : tw[r];
            const uint16_t* sp = full ? sc + r * lds + 4 * (size_t)b : ts[r];
            if (PF) {   // bytes two tiles ahead (past n1 too: a prefetch never faults). mmap'd
                        // weights sit on 4 KiB pages, where the hardware prefetchers stop
                _mm_prefetch((const char*)wp + PFD, _MM_HINT_T1);
                if ((b & 7) == 0) _mm_prefetch((const char*)sp + PFD / 8, _MM_HINT_T1);
            }
            __m512i w = _mm512_loadu_si512(wp);
            lo[r] = _mm512_and_si512(w, m4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
            ws[r] = block_scales(sp);
        }
        for (int t = 0; t < TT; t++)
            for (int r = 0; r < RB; r++) acc[r][t] = q8_block_fma(acc[r][t], lo[r], hi[r], xt[t][b], ws[r]);
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int RB>
static void q8_tiles(float* y, int ldy, const Q8Block* const* xt, int T, int I, const uint8_t* wb,
                     size_t ldw, const uint16_t* sc, size_t lds, bool pf) {
    for (int t0 = 0; t0 < T; t0 += 4) {
        float* yt = y + (size_t)t0 * ldy;
        const int tt = T - t0 < 4 ? T - t0 : 4;
        const bool p = pf && t0 == 0;     // prefetch during the first token tile only
#define K2_Q8(TT) (p ? q8_tile<RB, TT, true>(yt, ldy, xt + t0, I, wb, ldw, sc, lds) \
                     : q8_tile<RB, TT, false>(yt, ldy, xt + t0, I, wb, ldw, sc, lds))
        if (tt == 1) K2_Q8(1);
        else if (tt == 2) K2_Q8(2);
        else if (tt == 3) K2_Q8(3);
        else K2_Q8(4);
#undef K2_Q8
    }
}

// One token, 8 rows of whole 128-column blocks (group 32): each row is unpacked and used at
// once (named accumulators: an array of them would live on the stack), so 8 rows fit in
// registers and the per-row epilogue and loop costs are spread over twice as many rows as
// q8_tile<4, 1> (down_proj rows are only 16 blocks long). Same operations per (row, block) in
// the same order as q8_tile, so results are bit-identical to it.
static void q8_rows8(float* y, const Q8Block* x, int nb, const uint8_t* wb, size_t ldw,
                     const uint16_t* sc, size_t lds) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const size_t PFD = 16 * ldw > 16384 ? 16 * ldw : 16384;   // two 8-row tiles ahead
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int b = 0; b < nb; b++) {
        const Q8Block& X = x[b];
#define K2_ROW(r)                                                                                  \
        {                                                                                          \
            const uint8_t* wp = wb + r * ldw + 64 * (size_t)b;                                     \
            const uint16_t* sp = sc + r * lds + 4 * (size_t)b;                                     \
            _mm_prefetch((const char*)wp + PFD, _MM_HINT_T1);                                      \
            if ((b & 7) == 0) _mm_prefetch((const char*)sp + PFD / 8, _MM_HINT_T1);                \
            const __m512i w = _mm512_loadu_si512(wp);                                              \
            a##r = q8_block_fma(a##r, _mm512_and_si512(w, m4), _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), \
                                X, block_scales(sp));                                              \
        }
        K2_ROW(0) K2_ROW(1) K2_ROW(2) K2_ROW(3) K2_ROW(4) K2_ROW(5) K2_ROW(6) K2_ROW(7)
#undef K2_ROW
    }
    const __m512 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int r = 0; r < 8; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
}

void int4_rows_q8(float* y, int ldy, const void* const* xq, int T, int I, const int32_t* packed,
                  const uint16_t* scales, int group, int n0, int n1) {
    const Q8Block* const* xt = (const Q8Block* const*)xq;
    const int ng = I / 32;
    const size_t ldw = (size_t)I / 2, lds = (size_t)ceil_div(I, group);
    const uint8_t* w = (const uint8_t*)packed;
    // group > 32: the rows' scales expanded to one per 32 columns (a small copy per 4 rows)
    std::vector<uint16_t> s32(group == 32 ? 0 : 4 * (size_t)ng);
    auto rows_sc = [&](int n, int rb, size_t& ld) -> const uint16_t* {
        if (group == 32) { ld = lds; return scales + n * lds; }
        for (int r = 0; r < rb; r++)
            for (int g = 0; g < ng; g++) s32[(size_t)r * ng + g] = scales[(n + r) * lds + g * 32 / group];
        ld = ng;
        return s32.data();
    };
    // token chunks of 32 outside: the rows n0..n1 stay in L2 while x streams through once
    for (int c0 = 0; c0 < T; c0 += 32) {
        const int tc = T - c0 < 32 ? T - c0 : 32;
        float* yc = y + (size_t)c0 * ldy;
        size_t ld;
        int n = n0;
        if (tc == 1 && group == 32 && I % 128 == 0)     // one token: 8-row tiles
            for (; n + 8 <= n1; n += 8)
                q8_rows8(yc + n, xt[c0], I / 128, w + n * ldw, ldw, scales + n * lds, lds);
        for (; n + 4 <= n1; n += 4) {
            const uint16_t* sc = rows_sc(n, 4, ld);
            q8_tiles<4>(yc + n, ldy, xt + c0, tc, I, w + n * ldw, ldw, sc, ld, group == 32);
        }
        for (; n < n1; n++) {
            const uint16_t* sc = rows_sc(n, 1, ld);
            q8_tiles<1>(yc + n, ldy, xt + c0, tc, I, w + n * ldw, ldw, sc, ld, false);
        }
    }
}
#else
void int4_quant_x(void*, const float*, int) {}
void int4_rows_q8(float*, int, const void* const*, int, int, const int32_t*, const uint16_t*, int, int, int) {}
#endif
