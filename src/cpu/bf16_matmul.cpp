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

// TT tokens share each widened weight vector; two chains per token hide FMA latency.
template <int TT>
static void bf16_row_tile(float* y, int ldy, const float* x, int I, const uint16_t* wr) {
    __m512 acc[TT][2];
    for (int t = 0; t < TT; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    const int I32 = I / 32 * 32;
    for (int i = 0; i < I32; i += 32) {
        __m512 w0 = load_bf16x16(wr + i), w1 = load_bf16x16(wr + i + 16);
        for (int t = 0; t < TT; t++) {
            const float* xt = x + (size_t)t * I + i;
            acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xt), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xt + 16), acc[t][1]);
        }
    }
    for (int t = 0; t < TT; t++) y[(size_t)t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
#endif

void bf16_rows(float* y, int ldy, const float* x, int T, int I, const uint16_t* w, int n0, int n1) {
#ifdef K2_AVX512
    for (int n = n0; n < n1; n++) {
        const uint16_t* wr = w + (size_t)n * I;
        for (int t0 = 0; t0 < T; t0 += 8) {
            const float* xt = x + (size_t)t0 * I;
            float* yt = y + (size_t)t0 * ldy + n;
            switch (T - t0 < 8 ? T - t0 : 8) {
                case 1: bf16_row_tile<1>(yt, ldy, xt, I, wr); break;
                case 2: bf16_row_tile<2>(yt, ldy, xt, I, wr); break;
                case 3: bf16_row_tile<3>(yt, ldy, xt, I, wr); break;
                case 4: bf16_row_tile<4>(yt, ldy, xt, I, wr); break;
                case 5: bf16_row_tile<5>(yt, ldy, xt, I, wr); break;
                case 6: bf16_row_tile<6>(yt, ldy, xt, I, wr); break;
                case 7: bf16_row_tile<7>(yt, ldy, xt, I, wr); break;
                default: bf16_row_tile<8>(yt, ldy, xt, I, wr); break;
            }
        }
    }
    if (I % 32) bf16_rows_scalar(y, ldy, x, T, I, w, n0, n1, I / 32 * 32);
#else
    for (int n = n0; n < n1; n++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + n] = 0.f;
    bf16_rows_scalar(y, ldy, x, T, I, w, n0, n1, 0);
#endif
}

// ---------------------------------------------------------------- op: rows split over threads
void bf16_matmul(float* out, const float* x, const uint16_t* w, int T, int I, int N) {
    const int block = 16;
    #pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        bf16_rows(out, N, x, T, I, w, n0, n1);
    }
}
