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
// 4 rows (r0..r0+3) x TT tokens over chunks [c0, c1) (in L1: see tile_many); the 16
// accumulators live in acc_mem[r*4 + t] between calls.
template <int TT>
static void sub_block(__m512* acc_mem, const float* xd, size_t ldx, const uint16_t* tile, int r0, int c0,
                      int c1) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[4][TT];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = acc_mem[r * 4 + t];
    for (int c = c0; c < c1; c += TC) {
        __m512 xe[TT], xo[TT];
        for (int t = 0; t < TT; t++) {
            xe[t] = _mm512_loadu_ps(xd + t * ldx + c);
            xo[t] = _mm512_loadu_ps(xd + t * ldx + c + 16);
        }
        const uint16_t* wp = tile + (size_t)c * TR + TC * r0;
        for (int r = 0; r < 4; r++) {
            const __m512i v = _mm512_loadu_si512(wp + TC * r);
            const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            for (int t = 0; t < TT; t++)
                acc[r][t] = _mm512_fmadd_ps(wo, xo[t], _mm512_fmadd_ps(we, xe[t], acc[r][t]));
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < TT; t++) acc_mem[r * 4 + t] = acc[r][t];
}

// One token, all 16 rows, chunks [c0, c1); accumulators in acc_mem[r] between calls.
static void token_block(__m512* acc_mem, const float* xd, const uint16_t* tile, int c0, int c1) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[TR];
    for (int r = 0; r < TR; r++) acc[r] = acc_mem[r];
    for (int c = c0; c < c1; c += TC) {
        const __m512 xe = _mm512_loadu_ps(xd + c), xo = _mm512_loadu_ps(xd + c + 16);
        const uint16_t* wp = tile + (size_t)c * TR;
        for (int r = 0; r < TR; r++) {
            const __m512i v = _mm512_loadu_si512(wp + TC * r);
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), xo, acc[r]);
        }
    }
    for (int r = 0; r < TR; r++) acc_mem[r] = acc[r];
}

// One tile, all T tokens, in blocks of 16 chunks (16 KB of the tile): token 0 reads the block
// from memory in order (all 16 rows per chunk; alone, that is the whole decode path), then the other tokens reuse
// it from L1 in (4-row, 4-token) register tiles, each widened weight vector feeding 4 tokens.
// Partial sums wait in acc_mem between blocks: 16 vectors for token 0, then 16 per (4-row,
// 4-token) tile. (4-row tiles straight from memory touch a quarter of each 1 KB chunk per
// pass and ran at a third of the bandwidth.)
static void tile_many(float* s, const float* xd, int Ip, const uint16_t* tile, int T, __m512* acc_mem) {
    const int CB = 16 * TC, ntt = ceil_div(T - 1, 4);
    __m512* acc0 = acc_mem;
    __m512* accs = acc_mem + TR;
    for (size_t i = 0; i < (size_t)TR + (size_t)16 * ntt * 4; i++) acc_mem[i] = _mm512_setzero_ps();
    for (int c0 = 0; c0 < Ip; c0 += CB) {
        const int c1 = c0 + CB < Ip ? c0 + CB : Ip;
        token_block(acc0, xd, tile, c0, c1);
        for (int q = 0; q < ntt; q++) {
            const int t0 = 1 + 4 * q, tt = T - t0 < 4 ? T - t0 : 4;
            const float* xt = xd + (size_t)t0 * Ip;
            for (int r0 = 0; r0 < TR; r0 += 4) {
                __m512* a = accs + ((size_t)(r0 / 4) * ntt + q) * 16;
                if (tt == 1) sub_block<1>(a, xt, Ip, tile, r0, c0, c1);
                else if (tt == 2) sub_block<2>(a, xt, Ip, tile, r0, c0, c1);
                else if (tt == 3) sub_block<3>(a, xt, Ip, tile, r0, c0, c1);
                else sub_block<4>(a, xt, Ip, tile, r0, c0, c1);
            }
        }
    }
    for (int r = 0; r < TR; r++) s[r] = _mm512_reduce_add_ps(acc0[r]);
    for (int r0 = 0; r0 < TR; r0 += 4)
        for (int q = 0; q < ntt; q++)
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 4 && 1 + 4 * q + t < T; t++)
                    s[(size_t)(1 + 4 * q + t) * TR + r0 + r] =
                        _mm512_reduce_add_ps(accs[((size_t)(r0 / 4) * ntt + q) * 16 + r * 4 + t]);
}
#endif

#ifdef K2_BF16DP
// s[t*TR + r] = the tile's row r times token t with bf16 x (xb, row stride Ip), in the common.h
// order that bf16_matmul's rows use too: per chunk of BF16_DP_KC columns, per token, the 16
// rows' lane sums (the tile's zero padding adds +0 where the rows mask their last step).
static void tile_sums_dp(float* s, const uint16_t* xb, int Ip, const uint16_t* tile, int T) {
    for (int k0 = 0; k0 < Ip; k0 += BF16_DP_KC) {
        const int k1 = k0 + BF16_DP_KC < Ip ? k0 + BF16_DP_KC : Ip;
        for (int t = 0; t < T; t++) {
            __m512 acc[TR];
            for (int r = 0; r < TR; r++) acc[r] = _mm512_setzero_ps();
            const uint16_t* xt = xb + (size_t)t * Ip;
            for (int c = k0; c < k1; c += TC) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xt + c);
                const uint16_t* wp = tile + (size_t)c * TR;
                for (int r = 0; r < TR; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(wp + TC * r), xv);
            }
            for (int r = 0; r < TR; r++) {
                const float v = _mm512_reduce_add_ps(acc[r]);
                s[(size_t)t * TR + r] = k0 > 0 ? s[(size_t)t * TR + r] + v : v;
            }
        }
    }
}
#endif

// s[t*TR + r] = the tile's row r times token t, for all T tokens.
static void tile_sums(float* s, const float* xd, int Ip, const uint16_t* tile, int T, void* scratch) {
#ifdef K2_AVX512
    tile_many(s, xd, Ip, tile, T, (__m512*)scratch);
#else
    (void)scratch;
    for (int t = 0; t < T; t++)
        for (int r = 0; r < TR; r++) {
            float sum = 0.f;
            for (int c = 0; c < Ip; c += TC) {
                const uint16_t* w = tile + (size_t)c * TR + TC * r;
                const float* xc = xd + (size_t)t * Ip + c;
                for (int k = 0; k < TC / 2; k++)
                    sum += bf16_to_f32(w[2 * k]) * xc[k] + bf16_to_f32(w[2 * k + 1]) * xc[TC / 2 + k];
            }
            s[(size_t)t * TR + r] = sum;
        }
#endif
}

void bf16_tiled_matmul(float* out, const float* x, const uint16_t* data, int T, int I, int N) {
    const int Ip = ceil_div(I, TC) * TC, ntiles = ceil_div(N, TR);
    // x as the tile sums take it: bf16 for vdpbf16ps in bf16_matmul's order (common.h), else
    // fp32 de-interleaved (exact mode, builds without AVX512-BF16)
    std::vector<uint16_t> xb;
    std::vector<float> xd;
#ifdef K2_BF16DP
    const bool dp = !g_exact;
    if (dp) {
        xb.resize((size_t)T * Ip);
        bf16_round_x(xb.data(), Ip, x, T, I);
    }
#else
    const bool dp = false;
#endif
    if (!dp) {
        xd.resize((size_t)T * Ip);
        deinterleave_x(xd.data(), x, T, I, Ip);
    }
    #pragma omp parallel
    {
        std::vector<float> s((size_t)T * TR);
        // 64-byte aligned scratch for tile_many's vector accumulators (the fp32 path)
        std::vector<float> scratch(dp ? 0 : ((size_t)TR + (size_t)64 * ceil_div(T - 1, 4)) * 16 + 16);
        void* sp = align64(scratch.data());
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < ntiles; it++) {
            const uint16_t* tile = data + (size_t)it * TR * Ip;
            const int nr = N - it * TR < TR ? N - it * TR : TR;
#ifdef K2_BF16DP
            if (dp)
                tile_sums_dp(s.data(), xb.data(), Ip, tile, T);
            else
#endif
                tile_sums(s.data(), xd.data(), Ip, tile, T, sp);
            for (int t = 0; t < T; t++)
                for (int r = 0; r < nr; r++) out[(size_t)t * N + it * TR + r] = s[(size_t)t * TR + r];
        }
    }
}
