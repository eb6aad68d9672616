// BF16 matmul: y[T,N] = x[T,I] · w[N,I]ᵀ with w as bf16 bits. Widening bf16 -> fp32 is a
// 16-bit shift, so products are exact and sums fp32, as ref.bf16_matmul.
#include "common.h"

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
static inline __m512 load_bf16x16(const uint16_t* p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// Register tile of RB rows x TT tokens over 16 columns a step: x vectors are loaded once and
// reused by RB rows, each widened weight vector by TT tokens (RB·TT independent FMA chains).
// PF: software prefetch into L2 of the same columns 8 rows ahead, one line per row per 64 B
// (mmap'd weights sit on 4 KiB pages, where the hardware prefetchers stop; past the last row
// a prefetch never faults). The INT4 and FP8 kernels do the same.
template <int RB, int TT, bool PF>
static void bf16_tile(float* y, int ldy, const float* x, size_t ldx, int K, const uint16_t* w, size_t ldw,
                      bool add) {
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    const int K16 = K / 16 * 16;
    for (int i = 0; i < K16; i += 16) {
        __m512 xv[TT];
        for (int t = 0; t < TT; t++) xv[t] = _mm512_loadu_ps(x + (size_t)t * ldx + i);
        if (PF && (i & 31) == 0)
            for (int r = 0; r < RB; r++) _mm_prefetch((const char*)(w + (r + 8) * ldw + i), _MM_HINT_T1);
        for (int r = 0; r < RB; r++) {
            __m512 wv = load_bf16x16(w + r * ldw + i);
            for (int t = 0; t < TT; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
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

void bf16_rows(float* y, int ldy, const float* x, int T, int I, const uint16_t* w, int n0, int n1) {
#ifdef K2_AVX512
    // Several tokens over long rows (dense down_proj, I = 18432): columns in chunks of at most
    // 8192, so the rows' chunk stays in L2 while every token tile passes over it (whole rows
    // would be 590 KB per 16 rows, evicted by the x stream: 45 -> 90+ GMAC/s at T = 256).
    const int I16 = I / 16 * 16;
    const int nk = T > 1 ? ceil_div(I16, 8192) : 1;
    const int KC = nk > 1 ? ceil_div(ceil_div(I16, nk), 16) * 16 : I16;
    int k0 = 0;
    do {    // at least one pass, which also zeroes y when I < 16 (the scalar tail adds)
        const int K = I16 - k0 < KC ? I16 - k0 : KC;
        int n = n0;
        for (; n + 4 <= n1; n += 4) bf16_tiles<4>(y + n, ldy, x, T, I, k0, K, w + (size_t)n * I, k0 > 0);
        for (; n < n1; n++) bf16_tiles<1>(y + n, ldy, x, T, I, k0, K, w + (size_t)n * I, k0 > 0);
        k0 += KC;
    } while (k0 < I16);
    if (I % 16) bf16_rows_scalar(y, ldy, x, T, I, w, n0, n1, I16);
#else
    for (int n = n0; n < n1; n++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + n] = 0.f;
    bf16_rows_scalar(y, ldy, x, T, I, w, n0, n1, 0);
#endif
}

// ---------------------------------------------------------------- op: rows split over threads
void bf16_matmul(float* out, const float* x, const uint16_t* w, int T, int I, int N) {
    const int block = 16;   // rows per work item; dynamic chunks ride out a busy core
    #pragma omp parallel for schedule(dynamic, 4)
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        bf16_rows(out, N, x, T, I, w, n0, n1);
    }
}
