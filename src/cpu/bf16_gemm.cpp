// BF16 GEMM for prefill (many tokens): y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits and x
// rounded to bf16 once per call, on AVX512-BF16's vdpbf16ps (two bf16 products summed into
// each fp32 lane: 32 MACs per instruction, twice an FMA's 16).
//
// Many tokens make the matmul compute-bound, so the loop is a GEMM, not a GEMV: each lane of an
// accumulator is a different output row (an outer product), so nothing is reduced across lanes.
// That needs the weights "pair-interleaved": for a 32-bit column pair p, the pairs of 64 rows
// side by side ([p][row][2]). A call repacks each 64-row x KC-column panel of w into that
// layout in a per-thread buffer (16x16 32-bit transposes, once per panel), then every tile of
// TT tokens streams the panel from L2: per column pair four panel loads (4 x 16 rows), one
// broadcast of each token's x pair, 4·TT vdpbf16ps. On a 2-core Zen 4 that is the instruction's
// peak on one thread (~100 GMAC/s) and about 2x the fp32-FMA path at 256 tokens on two.
// Packing costs a pass over the weights that the tokens amortise (used from BF16_GEMM_MIN_T on).
//
// Precision: x's bf16 rounding (2^-9 relative) gives NMSE ~1e-6 against fp32 x, as the model
// runs on a GPU in bf16; products are exact, sums fp32 (k2lite.cpu.set_exact turns it off).
#include "common.h"

#if defined(K2_AVX512) && defined(__AVX512BF16__)
#include <vector>

namespace {

constexpr int PANEL = 64;       // rows per panel: four 16-lane accumulators per token
constexpr int KC = 1024;        // columns per panel (a 128 KB packed panel, in L2)
constexpr int TT = 6;           // tokens per register tile: 4 x 6 accumulators (of 32 registers)

// 16x16 transpose of 32-bit elements: r[i] = column i of the rows in r.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {   // 128-bit lanes: rows i, i+4, i+8, i+12 hold lane 0..3 parts
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

// Pack rows [0, nr) (nr <= PANEL; missing rows are zero) and column pairs [p0, p0 + np) of w
// into wp[p][PANEL]: 32-bit words, each a column pair of one row. A pair past column I has a
// zero high half, so that x's zero padding never meets a NaN.
void pack_panel(uint32_t* wp, const uint16_t* w, int I, int nr, int p0, int np) {
    const int full_pairs = I / 2;   // pairs with both columns inside the row
    for (int r0 = 0; r0 < PANEL; r0 += 16) {
        int p = 0;
        if (r0 + 16 <= nr)
            for (; p + 16 <= np && p0 + p + 16 <= full_pairs; p += 16) {
                __m512i v[16];
                for (int r = 0; r < 16; r++)
                    v[r] = _mm512_loadu_si512(w + (size_t)(r0 + r) * I + 2 * (size_t)(p0 + p));
                transpose16(v);
                for (int j = 0; j < 16; j++) _mm512_storeu_si512(wp + (size_t)(p + j) * PANEL + r0, v[j]);
            }
        for (; p < np; p++)         // partial blocks: one word at a time
            for (int r = r0; r < r0 + 16; r++) {
                uint32_t v = 0;
                const int c = 2 * (p0 + p);
                if (r < nr && c < I) {
                    const uint16_t* row = w + (size_t)r * I;
                    v = row[c] | (c + 1 < I ? (uint32_t)row[c + 1] << 16 : 0u);
                }
                wp[(size_t)p * PANEL + r] = v;
            }
    }
}

// y[t, 0..nr) (+)= Σ_p panel pairs · x pairs for the TTT tokens at xb (row stride ldx words).
template <int TTT>
void tile(float* y, int ldy, const uint32_t* xb, size_t ldx, const uint32_t* wp, int np, int nr, bool add) {
    constexpr int NB = PANEL / 16;
    __m512 a[NB][TTT];
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < TTT; t++) a[b][t] = _mm512_setzero_ps();
    for (int p = 0; p < np; p++) {
        __m512bh wv[NB];
        for (int b = 0; b < NB; b++) wv[b] = (__m512bh)_mm512_loadu_si512(wp + (size_t)p * PANEL + 16 * b);
        for (int t = 0; t < TTT; t++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xb[(size_t)t * ldx + p]);
            for (int b = 0; b < NB; b++) a[b][t] = _mm512_dpbf16_ps(a[b][t], wv[b], xv);
        }
    }
    for (int b = 0; b < NB; b++) {
        const int left = nr - 16 * b;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        for (int t = 0; t < TTT; t++) {
            float* yt = y + (size_t)t * ldy + 16 * b;
            __m512 v = a[b][t];
            if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, yt));
            _mm512_mask_storeu_ps(yt, m, v);
        }
    }
}

}  // namespace

void bf16_gemm(float* out, const float* x, const uint16_t* w, int T, int I, int N) {
    // x as bf16 pairs: [T, ldx] 32-bit words, zero-padded to a whole number of panels' columns
    const int pairs = ceil_div(I, 2);
    const size_t ldx = (size_t)ceil_div(pairs, 16) * 16;
    std::vector<uint32_t> xb((size_t)T * ldx, 0);
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * I;
        uint32_t* o = xb.data() + (size_t)t * ldx;
        int i = 0;
        for (; i + 32 <= I; i += 32)
            _mm512_storeu_si512(o + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xt + i + 16),
                                                                        _mm512_loadu_ps(xt + i)));
        for (; i < I; i++) {
            const float f = round_bf16(xt[i]);
            uint32_t u;
            std::memcpy(&u, &f, 4);
            o[i / 2] |= (u >> 16) << (16 * (i % 2));
        }
    }
    const int KP = KC / 2;      // column pairs per panel
    #pragma omp parallel
    {
        std::vector<uint32_t> wp((size_t)KP * PANEL);
        #pragma omp for schedule(dynamic, 1)
        for (int n0 = 0; n0 < N; n0 += PANEL) {
            const int nr = N - n0 < PANEL ? N - n0 : PANEL;
            for (int p0 = 0; p0 < pairs; p0 += KP) {
                const int np = pairs - p0 < KP ? pairs - p0 : KP;
                pack_panel(wp.data(), w + (size_t)n0 * I, I, nr, p0, np);
                for (int t = 0; t < T; t += TT) {
                    float* y = out + (size_t)t * N + n0;
                    const uint32_t* xt = xb.data() + (size_t)t * ldx + p0;
                    switch (T - t < TT ? T - t : TT) {    // the last tile takes what is left
                        case 1: tile<1>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                        case 2: tile<2>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                        case 3: tile<3>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                        case 4: tile<4>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                        case 5: tile<5>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                        default: tile<TT>(y, N, xt, ldx, wp.data(), np, nr, p0 > 0); break;
                    }
                }
            }
        }
    }
}
#endif
