// BF16 matmul: y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits. With AVX512-BF16 (and not g_exact)
// x is rounded to bf16 and multiplied with vdpbf16ps in one fixed order (common.h). Otherwise, and
// in exact mode, x stays fp32: widening bf16 -> fp32 is a 16-bit shift, so products are exact
// and sums fp32, as ref.bf16_matmul.
// On the AVX-512 path a 64-byte load holds 32 columns of a row, dword k = columns 2k (low
// half) and 2k+1 (high half): `v << 16` is the even columns as fp32 and `v & 0xFFFF0000` the
// odd ones, two plain ALU ops per 32 weights (a zero-extending 16->32 widen is a cross-lane
// shuffle, and took twice the ops). x is prepared to match once per call (bf16_prep_x): per
// 32-column chunk its 16 even columns, then its 16 odd ones.
#include "common.h"
#include <vector>

void bf16_prep_x(float* xd, const float* x, int T, int I) {
#ifdef K2_AVX512
    const int I32 = I / 32 * 32;
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * I;
        float* o = xd + (size_t)t * I;
        for (int c = 0; c < I32; c += 32)
            for (int k = 0; k < 16; k++) { o[c + k] = xt[c + 2 * k]; o[c + 16 + k] = xt[c + 2 * k + 1]; }
        for (int i = I32; i < I; i++) o[i] = xt[i];       // the tail stays in order (scalar loop)
    }
#else
    std::memcpy(xd, x, sizeof(float) * (size_t)T * I);
#endif
}

// ---------------------------------------------------------------- scalar
static void bf16_rows_scalar(float* y, int ldy, const float* x, int T, int I, const uint16_t* w,
                             int n0, int n1, int i0) {
    // columns i0..I-1 only (the SIMD path hands over its tail); adds into y
    for (int n = n0; n < n1; n++) {
        const uint16_t* wr = w + (size_t)n * I;
        for (int t = 0; t < T; t++) {
            const float* xt = x + (size_t)t * I;
            float sum = 0.f;
            for (int i = i0; i < I; i++) sum += xt[i] * bf16_to_f32(wr[i]);
            y[(size_t)t * ldy + n] += sum;
        }
    }
}

// ---------------------------------------------------------------- AVX-512
#ifdef K2_AVX512
// Register tile of RB rows x TT tokens over 32 columns a step: x vectors are loaded once and
// reused by RB rows, each widened weight vector by TT tokens (2·RB·TT FMAs per step).
// PF: software prefetch into L2 of the same columns 8 rows ahead, one line per row
// (mmap'd weights sit on 4 KiB pages, where the hardware prefetchers stop; past the last row
// a prefetch never faults). The INT4 and FP8 kernels do the same.
template <int RB, int TT, bool PF>
static void bf16_tile(float* y, int ldy, const float* x, size_t ldx, int K, const uint16_t* w, size_t ldw,
                      bool add) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int i = 0; i < K; i += 32) {
        __m512 xe[TT], xo[TT];
        for (int t = 0; t < TT; t++) {
            xe[t] = _mm512_loadu_ps(x + (size_t)t * ldx + i);
            xo[t] = _mm512_loadu_ps(x + (size_t)t * ldx + i + 16);
        }
        if (PF)
            for (int r = 0; r < RB; r++) _mm_prefetch((const char*)(w + (r + 8) * ldw + i), _MM_HINT_T1);
        for (int r = 0; r < RB; r++) {
            const __m512i v = _mm512_loadu_si512(w + r * ldw + i);
            const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm512_fmadd_ps(wo, xo[t], _mm512_fmadd_ps(we, xe[t], acc[r][t]));
        }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) {
            const float v = _mm512_reduce_add_ps(acc[r][t]);
            y[(size_t)t * ldy + r] = add ? y[(size_t)t * ldy + r] + v : v;
        }
}

// Columns [k0, k0+K) of the RB rows at w (row stride I), every token; add: into y.
template <int RB>
static void bf16_tiles(float* y, int ldy, const float* x, int T, int I, int k0, int K, const uint16_t* w,
                       bool add) {
    for (int t0 = 0; t0 < T; t0 += 4) {      // token tiles of <= 4; the RB rows stay in L1/L2
        const float* xt = x + (size_t)t0 * I + k0;
        float* yt = y + (size_t)t0 * ldy;
        const uint16_t* wk = w + k0;
        const bool pf = t0 == 0;              // prefetch during the first token tile only
        switch ((T - t0 < 4 ? T - t0 : 4) + (pf ? 4 : 0)) {
            case 1: bf16_tile<RB, 1, false>(yt, ldy, xt, I, K, wk, I, add); break;
            case 2: bf16_tile<RB, 2, false>(yt, ldy, xt, I, K, wk, I, add); break;
            case 3: bf16_tile<RB, 3, false>(yt, ldy, xt, I, K, wk, I, add); break;
            case 4: bf16_tile<RB, 4, false>(yt, ldy, xt, I, K, wk, I, add); break;
            case 5: bf16_tile<RB, 1, true>(yt, ldy, xt, I, K, wk, I, add); break;
            case 6: bf16_tile<RB, 2, true>(yt, ldy, xt, I, K, wk, I, add); break;
            case 7: bf16_tile<RB, 3, true>(yt, ldy, xt, I, K, wk, I, add); break;
            default: bf16_tile<RB, 4, true>(yt, ldy, xt, I, K, wk, I, add); break;
        }
    }
}
#endif

void bf16_rows(float* y, int ldy, const float* xd, int T, int I, const uint16_t* w, int n0, int n1) {
#ifdef K2_AVX512
    // Several tokens over long rows (dense down_proj, I = 18432): columns in chunks of at most
    // 8192, so the rows' chunk stays in L2 while every token tile passes over it (whole rows
    // would be 590 KB per 16 rows, evicted by the x stream: 45 -> 90+ GMAC/s at T = 256).
    const int I32 = I / 32 * 32;
    const int nk = T > 1 ? ceil_div(I32, 8192) : 1;
    const int KC = nk > 1 ? ceil_div(ceil_div(I32, nk), 32) * 32 : I32;
    int k0 = 0;
    do {    // at least one pass, which also zeroes y when I < 32 (the scalar tail adds)
        const int K = I32 - k0 < KC ? I32 - k0 : KC;
        int n = n0;
        for (; n + 4 <= n1; n += 4) bf16_tiles<4>(y + n, ldy, xd, T, I, k0, K, w + (size_t)n * I, k0 > 0);
        for (; n < n1; n++) bf16_tiles<1>(y + n, ldy, xd, T, I, k0, K, w + (size_t)n * I, k0 > 0);
        k0 += KC;
    } while (k0 < I32);
    if (I % 32) bf16_rows_scalar(y, ldy, xd, T, I, w, n0, n1, I32);
#else
    for (int n = n0; n < n1; n++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + n] = 0.f;
    bf16_rows_scalar(y, ldy, xd, T, I, w, n0, n1, 0);
#endif
}

// ---------------------------------------------------------------- AVX512-BF16: bf16 x, vdpbf16ps
#ifdef K2_BF16DP
void bf16_round_x(uint16_t* xb, size_t ldx, const float* x, int T, int I) {
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * I;
        uint16_t* o = xb + (size_t)t * ldx;
        int i = 0;
        for (; i + 32 <= I; i += 32)    // vcvtne2ps2bf16: round to nearest even, as round_bf16
            _mm512_storeu_si512(o + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xt + i + 16),
                                                                    _mm512_loadu_ps(xt + i)));
        for (; i < I; i++) {
            const float f = round_bf16(xt[i]);
            uint32_t u;
            std::memcpy(&u, &f, 4);
            o[i] = (uint16_t)(u >> 16);
        }
        for (; i < (int)ldx; i++) o[i] = 0;
    }
}

// RB rows x TT tokens, columns [k0, k0+K) of rows of length I (w row stride ldw): the common.h
// order. A row's partial last step is a masked load (nothing read past the row; x is padded).
// PF: L2 prefetch of the same columns 8 rows ahead, as bf16_tile.
template <int RB, int TT, bool PF = false>
static void dp_tile(float* y, int ldy, const uint16_t* xb, size_t ldx, int k0, int K, int I,
                    const uint16_t* w, size_t ldw) {
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int i = k0; i < k0 + K; i += 32) {
        const __mmask32 m = I - i >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (I - i)) - 1);
        __m512bh xv[TT];
        for (int t = 0; t < TT; t++) xv[t] = (__m512bh)_mm512_loadu_si512(xb + (size_t)t * ldx + i);
        if (PF)
            for (int r = 0; r < RB; r++) _mm_prefetch((const char*)(w + (r + 8) * ldw + i), _MM_HINT_T1);
        for (int r = 0; r < RB; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ldw + i);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) {
            const float v = _mm512_reduce_add_ps(acc[r][t]);
            y[(size_t)t * ldy + r] = k0 > 0 ? y[(size_t)t * ldy + r] + v : v;
        }
}

// Decode (T <= 4): rows [0, nr) of w in 4-row groups, each streamed whole (its chunks in order)
// with prefetch, as the fp32 rows. Only the loop order differs from dp_rows: same sums.
template <int TT>
static void dp_rows_few(float* y, int ldy, const uint16_t* xb, size_t ldx, int I, const uint16_t* w, int nr) {
    constexpr int KC = BF16_DP_KC;
    int r = 0;
    for (; r + 4 <= nr; r += 4)
        for (int k0 = 0; k0 < I; k0 += KC)
            dp_tile<4, TT, true>(y + r, ldy, xb, ldx, k0, I - k0 < KC ? I - k0 : KC, I, w + (size_t)r * I, I);
    for (; r < nr; r++)
        for (int k0 = 0; k0 < I; k0 += KC)
            dp_tile<1, TT>(y + r, ldy, xb, ldx, k0, I - k0 < KC ? I - k0 : KC, I, w + (size_t)r * I, I);
}

// One 4-row group's chunk [k0, k0+K) for tokens [0, T) in tiles of <= 4, the first tile with the
// prefetch; the group's chunk (16 KB) stays in L1 for the others.
static void dp_group(float* y, int ldy, const uint16_t* xb, size_t ldx, int T, int k0, int K, int I,
                     const uint16_t* wr) {
    for (int t0 = 0; t0 < T; t0 += 4) {
        float* yt = y + (size_t)t0 * ldy;
        const uint16_t* xt = xb + (size_t)t0 * ldx;
        switch ((T - t0 < 4 ? T - t0 : 4) + (t0 == 0 ? 4 : 0)) {
            case 1: dp_tile<4, 1>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 2: dp_tile<4, 2>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 3: dp_tile<4, 3>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 4: dp_tile<4, 4>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 5: dp_tile<4, 1, true>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 6: dp_tile<4, 2, true>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            case 7: dp_tile<4, 3, true>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
            default: dp_tile<4, 4, true>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
        }
    }
}

// Rows [0, nr) of w for every token. Batched decode (T <= 32: x's chunk, <= 128 KB, stays in
// L2): each 4-row group streamed whole with prefetch, as dp_rows_few; without the prefetch the
// first token tile waited on every weight line (T=8 ran at a quarter of T=4's speed).
// Larger T (prefill): tokens in blocks of TB, so a block's x chunk (TB x KC
// bf16, 128 KB) stays in L2 while each 4-row group of the rows passes over it, and a group's
// chunk (16 KB) in L1 while the block's 4-token tiles do.
static void dp_rows(float* y, int ldy, const uint16_t* xb, size_t ldx, int T, int I, const uint16_t* w, int nr) {
    switch (T) {
        case 1: return dp_rows_few<1>(y, ldy, xb, ldx, I, w, nr);
        case 2: return dp_rows_few<2>(y, ldy, xb, ldx, I, w, nr);
        case 3: return dp_rows_few<3>(y, ldy, xb, ldx, I, w, nr);
        case 4: return dp_rows_few<4>(y, ldy, xb, ldx, I, w, nr);
    }
    constexpr int KC = BF16_DP_KC, TB = 32;
    if (T <= TB) {
        int r = 0;
        for (; r + 4 <= nr; r += 4)
            for (int k0 = 0; k0 < I; k0 += KC)
                dp_group(y + r, ldy, xb, ldx, T, k0, I - k0 < KC ? I - k0 : KC, I, w + (size_t)r * I);
        for (; r < nr; r++)
            for (int t = 0; t < T; t++)
                for (int k0 = 0; k0 < I; k0 += KC)
                    dp_tile<1, 1>(y + (size_t)t * ldy + r, ldy, xb + (size_t)t * ldx, ldx, k0,
                                  I - k0 < KC ? I - k0 : KC, I, w + (size_t)r * I, I);
        return;
    }
    for (int k0 = 0; k0 < I; k0 += KC) {
        const int K = I - k0 < KC ? I - k0 : KC;
        for (int b0 = 0; b0 < T; b0 += TB) {
            const int b1 = T - b0 < TB ? T : b0 + TB;
            for (int r = 0; r < nr; r += 4) {
                const uint16_t* wr = w + (size_t)r * I;
                for (int t0 = b0; t0 < b1; t0 += 4) {
                    float* yt = y + (size_t)t0 * ldy + r;
                    const uint16_t* xt = xb + (size_t)t0 * ldx;
                    const int tt = b1 - t0 < 4 ? b1 - t0 : 4;
                    if (nr - r >= 4) {
                        switch (tt) {
                            case 1: dp_tile<4, 1>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
                            case 2: dp_tile<4, 2>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
                            case 3: dp_tile<4, 3>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
                            default: dp_tile<4, 4>(yt, ldy, xt, ldx, k0, K, I, wr, I); break;
                        }
                    } else {
                        for (int rr = r; rr < nr; rr++)
                            for (int t = 0; t < tt; t++)
                                dp_tile<1, 1>(yt + (size_t)t * ldy + (rr - r), ldy, xt + (size_t)t * ldx, ldx, k0,
                                              K, I, w + (size_t)rr * I, I);
                    }
                }
            }
        }
    }
}

static void bf16_matmul_dp(float* out, const float* x, const uint16_t* w, int T, int I, int N) {
    const size_t ldx = (size_t)ceil_div(I, 32) * 32;
    std::vector<uint16_t> xb((size_t)T * ldx);
    bf16_round_x(xb.data(), ldx, x, T, I);
    const int block = 16;    // rows per work item, one at a time (as bf16_matmul below)
    #pragma omp parallel for schedule(dynamic, 1)
    for (int n0 = 0; n0 < N; n0 += block)
        dp_rows(out + n0, N, xb.data(), ldx, T, I, w + (size_t)n0 * I, N - n0 < block ? N - n0 : block);
}
#endif

// ---------------------------------------------------------------- op: rows split over threads
void bf16_matmul(float* out, const float* x, const uint16_t* w, int T, int I, int N) {
    if (I == 0) {       // an empty sum (the column loops below would not write y at all)
        std::memset(out, 0, sizeof(float) * (size_t)T * N);
        return;
    }
#ifdef K2_BF16DP
    if (!g_exact) return bf16_matmul_dp(out, x, w, T, I, N);
#endif
    std::vector<float> xd((size_t)T * I);
    bf16_prep_x(xd.data(), x, T, I);
    // 16 rows per work item, handed out one at a time: dynamic items ride out a busy core, and
    // single items keep the end of the call even (chunks of 4 items = 0.9 MB at I = 7168 left
    // one thread idle for up to that long: kv_a 576x7168 at T=1 0.62-0.75 -> 0.79-0.80 of read)
    const int block = 16;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        bf16_rows(out, N, xd.data(), T, I, w, n0, n1);
    }
}
