// BF16 matmul over the tiled layout (formats.TiledBF16): y[T,N] = x[T,I] · w[N,I]ᵀ where w is
// stored as tiles of 16 rows, each tile column chunk by column chunk: data[N/16][I/32][16][32].
// A tile is then one sequential stream, and 16 rows share every x load. Measured on the
// 2-core Zen 4 box (standalone harness, 163840x7168): one core 0.76 of the read bandwidth vs
// 0.61-0.66 for row-major 4-row tiles, whose 4 row streams and x reloads (50% extra L1 fills
// from L2) cost the difference; two cores 0.94 vs 0.82-0.87.
//
// In a 64-byte chunk of one row, dword k holds columns 2k (low half) and 2k+1 (high half):
// `v << 16` is the even columns as fp32, `v & 0xFFFF0000` the odd ones, exact. x is prepared
// once per call de-interleaved to match: per chunk, 16 even columns then 16 odd ones.
#include "common.h"
#include <vector>
#include <algorithm>

static const int TR = 16, TC = 32;   // tile rows, chunk columns

// xd[t, Ip]: per 32-column chunk the even columns, then the odd ones; zero past I.
static void deinterleave_x(float* xd, const float* x, int T, int I, int Ip) {
    for (int t = 0; t < T; t++)
        for (int c = 0; c < Ip; c += TC)
            for (int k = 0; k < TC / 2; k++) {
                const int e = c + 2 * k, o = e + 1;
                xd[(size_t)t * Ip + c + k] = e < I ? x[(size_t)t * I + e] : 0.f;
                xd[(size_t)t * Ip + c + TC / 2 + k] = o < I ? x[(size_t)t * I + o] : 0.f;
            }
}

#ifdef K2_AVX512
// One token, the tile's 16 rows, chunks [c0, c1): one accumulator per row.
static void tile_t1(float* acc_out, const float* xd, const uint16_t* tile, int c0, int c1) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[TR];
    for (int r = 0; r < TR; r++) acc[r] = _mm512_setzero_ps();
    for (int c = c0; c < c1; c += TC) {
        const __m512 xe = _mm512_loadu_ps(xd + c), xo = _mm512_loadu_ps(xd + c + 16);
        const uint16_t* wp = tile + (size_t)c * TR;
        for (int r = 0; r < TR; r++) {
            const __m512i v = _mm512_loadu_si512(wp + TC * r);
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), xo, acc[r]);
        }
    }
    for (int r = 0; r < TR; r++) acc_out[r] = _mm512_reduce_add_ps(acc[r]);
}

// TT tokens x 4 rows (r0..r0+3 of the tile), chunks [c0, c1); sums into s[t*TR + r].
template <int TT>
static void tile_tt(float* s, const float* xd, size_t ldx, const uint16_t* tile, int r0, int c0, int c1) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[4][TT];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int c = c0; c < c1; c += TC) {
        __m512 xe[TT], xo[TT];
        for (int t = 0; t < TT; t++) {
            xe[t] = _mm512_loadu_ps(xd + t * ldx + c);
            xo[t] = _mm512_loadu_ps(xd + t * ldx + c + 16);
        }
        const uint16_t* wp = tile + (size_t)c * TR + TC * r0;
        if (r0 == 0)      // the first sub-tile pulls whole chunks (4 ahead) for the other three
            for (int l = 0; l < TR; l++) _mm_prefetch((const char*)(wp + 4 * TC * TR + TC * l), _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            const __m512i v = _mm512_loadu_si512(wp + TC * r);
            const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm512_fmadd_ps(wo, xo[t], _mm512_fmadd_ps(we, xe[t], acc[r][t]));
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) s[t * TR + r0 + r] += _mm512_reduce_add_ps(acc[r][t]);
}
#endif

// Sums of one tile for tokens [t0, t0+tt) (tt <= 4) over chunks [c0, c1), added into s[t*TR + r].
// few: a small batch (decode), where the tile streams from DRAM: one whole-tile pass per token
// (the later passes hit L2) beats 4-row sub-tiles, which touch a quarter of each 1 KB chunk
// per pass (measured 11 vs 29 GB/s at T = 4). Many tokens (prefill) are compute-bound: the
// 4 x 4 register tiles reuse each widened weight four times.
static void tile_sums(float* s, const float* xd, size_t ldx, const uint16_t* tile, int tt, int c0, int c1,
                      bool few) {
#ifdef K2_AVX512
    if (tt == 1 || few) {
        for (int t = 0; t < tt; t++) {
            float part[TR];
            tile_t1(part, xd + t * ldx, tile, c0, c1);
            for (int r = 0; r < TR; r++) s[t * TR + r] += part[r];
        }
        return;
    }
    for (int r0 = 0; r0 < TR; r0 += 4) {
        if (tt == 2) tile_tt<2>(s, xd, ldx, tile, r0, c0, c1);
        else if (tt == 3) tile_tt<3>(s, xd, ldx, tile, r0, c0, c1);
        else tile_tt<4>(s, xd, ldx, tile, r0, c0, c1);
    }
#else
    (void)few;
    for (int t = 0; t < tt; t++)
        for (int c = c0; c < c1; c += TC)
            for (int r = 0; r < TR; r++) {
                const uint16_t* w = tile + (size_t)c * TR + TC * r;
                const float* xc = xd + t * ldx + c;
                float sum = 0.f;
                for (int k = 0; k < TC / 2; k++)
                    sum += bf16_to_f32(w[2 * k]) * xc[k] + bf16_to_f32(w[2 * k + 1]) * xc[TC / 2 + k];
                s[t * TR + r] += sum;
            }
#endif
}

void bf16_tiled_matmul(float* out, const float* x, const uint16_t* data, int T, int I, int N) {
    const int Ip = ceil_div(I, TC) * TC, ntiles = ceil_div(N, TR);
    std::vector<float> xd((size_t)T * Ip);
    deinterleave_x(xd.data(), x, T, I, Ip);
    // several tokens over long rows: column chunks of <= 8192 so a tile's chunk (256 KB)
    // stays in L2 while every token tile passes over it
    const int nk = T > 1 ? ceil_div(Ip, 8192) : 1;
    const int KC = ceil_div(ceil_div(Ip, nk), TC) * TC;
    #pragma omp parallel
    {
        std::vector<float> s((size_t)T * TR);
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < ntiles; it++) {
            const uint16_t* tile = data + (size_t)it * TR * Ip;
            const int nr = N - it * TR < TR ? N - it * TR : TR;
            std::fill(s.begin(), s.end(), 0.f);
            for (int c0 = 0; c0 < Ip; c0 += KC)
                for (int t0 = 0; t0 < T; t0 += 4)
                    tile_sums(&s[(size_t)t0 * TR], xd.data() + (size_t)t0 * Ip, Ip, tile,
                              T - t0 < 4 ? T - t0 : 4, c0, c0 + KC < Ip ? c0 + KC : Ip, T <= 4);
            for (int t = 0; t < T; t++)
                for (int r = 0; r < nr; r++) out[(size_t)t * N + it * TR + r] = s[(size_t)t * TR + r];
        }
    }
}
