// INT4 (compressed-tensors pack-quantized) matmul: y[T,N] = x[T,I] · W[N,I]ᵀ, reading the
// checkpoint layout directly. int4_matmul takes the int8-activation VNNI path of
// int4_matmul_vnni.cpp when int4_vnni() allows (bf16 scales, the usual case); this file is the
// exact path (float32 scales, other groups, set_exact): activations stay fp32 (exact
// products, fp32 sums).
// Each group of 32 inputs is 4 int32 words = 16 bytes; byte k holds column 2k in its low
// nibble and 2k+1 in its high nibble, so on the SIMD path x is de-interleaved once per call
// (evens, then odds) and each 16-byte load feeds two 16-lane FMAs without any shuffle.
#include "common.h"
#include <vector>

bool int4_fast(int I, int group) {
#ifdef K2_AVX512
    return I % 32 == 0 && group % 32 == 0;
#else
    (void)I; (void)group;
    return false;
#endif
}

// The BF16 dot-product path: bf16 scales (so every weight is a bf16 value, exactly as ref)
// and a CPU with AVX512-BF16; x is then split into bf16 hi + lo parts (x ≈ hi + lo to 2^-17).
static bool int4_dpbf16(int I, int group, bool sf32) {
#if defined(K2_AVX512) && defined(__AVX512BF16__)
    return int4_fast(I, group) && !sf32;
#else
    (void)I; (void)group; (void)sf32;
    return false;
#endif
}

static inline uint16_t f32_to_bf16_bits(float f) {
    float r = round_bf16(f);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    return (uint16_t)(u >> 16);
}

void int4_prep_x(float* xp, const float* x, int T, int I, int group, bool sf32) {
    if (!int4_fast(I, group)) {
        std::memcpy(xp, x, sizeof(float) * (size_t)T * I);
        return;
    }
    if (int4_dpbf16(I, group, sf32)) {       // per token: hi[I] then lo[I], bf16 bits
        for (int t = 0; t < T; t++) {
            const float* xt = x + (size_t)t * I;
            uint16_t* hi = (uint16_t*)(xp + (size_t)t * I);
            uint16_t* lo = hi + I;
            for (int i = 0; i < I; i++) {
                hi[i] = f32_to_bf16_bits(xt[i]);
                lo[i] = f32_to_bf16_bits(xt[i] - bf16_to_f32(hi[i]));
            }
        }
        return;
    }
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * I;
        float* ev = xp + (size_t)t * I;       // [I/2] even columns
        float* od = ev + I / 2;               // [I/2] odd columns
        for (int i = 0; i < I / 2; i++) { ev[i] = xt[2 * i]; od[i] = xt[2 * i + 1]; }
    }
}

// ---------------------------------------------------------------- scalar (any I, any group)
static void int4_rows_scalar(float* y, int ldy, const float* x, int T, int I, const int32_t* packed,
                             const void* scales, bool sf32, int group, int n0, int n1) {
    const int lp = ceil_div(I, 8), ls = ceil_div(I, group);
    for (int n = n0; n < n1; n++) {
        const uint32_t* p = (const uint32_t*)packed + (size_t)n * lp;
        for (int t = 0; t < T; t++) {
            const float* xt = x + (size_t)t * I;
            float sum = 0.f;
            for (int i = 0; i < I; i++) {
                int code = (int)((p[i >> 3] >> (4 * (i & 7))) & 15) - 8;
                size_t si = (size_t)n * ls + i / group;
                float s = sf32 ? ((const float*)scales)[si] : bf16_to_f32(((const uint16_t*)scales)[si]);
                float w = code * s;
                sum += xt[i] * (sf32 ? w : round_bf16(w));
            }
            y[(size_t)t * ldy + n] = sum;
        }
    }
}

// ---------------------------------------------------------------- AVX-512 (I, group % 32 == 0)
#ifdef K2_AVX512
// Row scales -> one float per 32-column group (sf[g] = scale of columns 32g..32g+31).
static inline void row_scales(float* sf, const void* scales, bool sf32, int n, int I, int group) {
    const int ng = I / 32, ls = ceil_div(I, group);
    if (!sf32 && group == 32) {
        const uint16_t* s = (const uint16_t*)scales + (size_t)n * ls;
        int g = 0;
        for (; g + 16 <= ng; g += 16) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + g)));
            _mm512_storeu_ps(sf + g, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
        for (; g < ng; g++) sf[g] = bf16_to_f32(s[g]);
        return;
    }
    const int per = group / 32;
    for (int g = 0; g < ng; g++) {
        size_t si = (size_t)n * ls + g / per;
        sf[g] = sf32 ? ((const float*)scales)[si] : bf16_to_f32(((const uint16_t*)scales)[si]);
    }
}

// round_bf16 on 16 lanes (ties to even)
static inline __m512 round_bf16_x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

// Register tile of RB rows x TT tokens: the TT tokens' x vectors are loaded once per group and
// reused by RB rows; each row's group is unpacked once and used by 2·TT FMAs. A 16-entry table
// holds the group's weights (code - 8) * scale for codes 0..15, rounded to bf16 when the scales
// are bf16 (RNE, as round_bf16); two vpermps look the low and high nibbles up in it.
template <int RB, int TT, bool ROUND>
static void int4_tile(float* y, int ldy, const float* xp, int I, const uint8_t* wb, size_t ldw,
                      const float* sf) {
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const int ng = I / 32, half = I / 2;
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512 xl[TT], xh[TT];
        for (int t = 0; t < TT; t++) {
            xl[t] = _mm512_loadu_ps(xp + (size_t)t * I + 16 * g);          // even columns
            xh[t] = _mm512_loadu_ps(xp + (size_t)t * I + half + 16 * g);   // odd columns
        }
        for (int r = 0; r < RB; r++) {
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wb + r * ldw + 16 * g)));
            __m512 tab = _mm512_mul_ps(lut, _mm512_set1_ps(sf[r * ng + g]));
            if (ROUND) tab = round_bf16_x16(tab);
            __m512 wlo = _mm512_permutexvar_ps(d, tab);
            __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), tab);
            for (int t = 0; t < TT; t++) {
                acc[r][t] = _mm512_fmadd_ps(wlo, xl[t], acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(whi, xh[t], acc[r][t]);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int RB>
static void int4_tiles(float* y, int ldy, const float* xp, int T, int I, const uint8_t* wb,
                       size_t ldw, const float* sf, bool round) {
    // token tiles of <= 4; the RB rows (RB·I/2 bytes) stay in L1 between tiles
    for (int t0 = 0; t0 < T; t0 += 4) {
        const float* xt = xp + (size_t)t0 * I;
        float* yt = y + (size_t)t0 * ldy;
        const int tt = T - t0 < 4 ? T - t0 : 4;
#define K2_TILE(TT) (round ? int4_tile<RB, TT, true>(yt, ldy, xt, I, wb, ldw, sf) \
                           : int4_tile<RB, TT, false>(yt, ldy, xt, I, wb, ldw, sf))
        if (tt == 1) K2_TILE(1);
        else if (tt == 2) K2_TILE(2);
        else if (tt == 3) K2_TILE(3);
        else K2_TILE(4);
#undef K2_TILE
    }
}

// ---------------------------------------------------------------- AVX512-BF16 (bf16 scales)
#ifdef __AVX512BF16__
// Same tiles, but each group's 32 weights become bf16 words in column order (a vpermw lookup
// in the group's rounded 16-entry table) and vdpbf16ps does 32 exact products per instruction,
// once with x's hi part and once with its lo part: about half the vector work of the fp32 path.
template <int RB, int TT>
static void int4_tile_bf16(float* y, int ldy, const uint16_t* xb, int I, const uint8_t* wb,
                           size_t ldw, const float* sf) {
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i nib = _mm512_set1_epi32(0x000F000F);
    const int ng = I / 32;
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512bh xh[TT], xl[TT];
        for (int t = 0; t < TT; t++) {
            const uint16_t* xt = xb + (size_t)t * 2 * I + 32 * g;
            xh[t] = (__m512bh)_mm512_loadu_si512(xt);
            xl[t] = (__m512bh)_mm512_loadu_si512(xt + I);
        }
        for (int r = 0; r < RB; r++) {
            // byte k -> dword k = (low nibble | high nibble << 16): word 2k, 2k+1 = columns 2k, 2k+1
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wb + r * ldw + 16 * g)));
            __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nib, 0xA8);  // (a|b)&c
            __m256bh tab = _mm512_cvtneps_pbh(_mm512_mul_ps(lut, _mm512_set1_ps(sf[r * ng + g])));
            __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, _mm512_castsi256_si512((__m256i)tab));
            for (int t = 0; t < TT; t++) {
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w, xh[t]);
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w, xl[t]);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int RB>
static void int4_tiles_bf16(float* y, int ldy, const float* xp, int T, int I, const uint8_t* wb,
                            size_t ldw, const float* sf) {
    for (int t0 = 0; t0 < T; t0 += 4) {
        const uint16_t* xt = (const uint16_t*)(xp + (size_t)t0 * I);
        float* yt = y + (size_t)t0 * ldy;
        switch (T - t0 < 4 ? T - t0 : 4) {
            case 1: int4_tile_bf16<RB, 1>(yt, ldy, xt, I, wb, ldw, sf); break;
            case 2: int4_tile_bf16<RB, 2>(yt, ldy, xt, I, wb, ldw, sf); break;
            case 3: int4_tile_bf16<RB, 3>(yt, ldy, xt, I, wb, ldw, sf); break;
            default: int4_tile_bf16<RB, 4>(yt, ldy, xt, I, wb, ldw, sf); break;
        }
    }
}
#endif

static void int4_rows_avx512(float* y, int ldy, const float* xp, int T, int I, const int32_t* packed,
                             const void* scales, bool sf32, int group, int n0, int n1) {
    const int ng = I / 32;
    const size_t ldw = (size_t)I / 2;                     // bytes per packed row
    std::vector<float> sf(4 * (size_t)ng);               // [4 rows, ng] float scales
    int n = n0;
    for (; n + 4 <= n1; n += 4) {
        for (int r = 0; r < 4; r++) row_scales(&sf[(size_t)r * ng], scales, sf32, n + r, I, group);
        const uint8_t* wb = (const uint8_t*)packed + n * ldw;
#ifdef __AVX512BF16__
        if (!sf32) { int4_tiles_bf16<4>(y + n, ldy, xp, T, I, wb, ldw, sf.data()); continue; }
#endif
        int4_tiles<4>(y + n, ldy, xp, T, I, wb, ldw, sf.data(), !sf32);
    }
    for (; n < n1; n++) {
        row_scales(sf.data(), scales, sf32, n, I, group);
        const uint8_t* wb = (const uint8_t*)packed + n * ldw;
#ifdef __AVX512BF16__
        if (!sf32) { int4_tiles_bf16<1>(y + n, ldy, xp, T, I, wb, ldw, sf.data()); continue; }
#endif
        int4_tiles<1>(y + n, ldy, xp, T, I, wb, ldw, sf.data(), !sf32);
    }
}
#endif

void int4_rows(float* y, int ldy, const float* xp, int T, int I, const int32_t* packed,
               const void* scales, bool sf32, int group, int n0, int n1) {
#ifdef K2_AVX512
    if (int4_fast(I, group)) {
        int4_rows_avx512(y, ldy, xp, T, I, packed, scales, sf32, group, n0, n1);
        return;
    }
#endif
    int4_rows_scalar(y, ldy, xp, T, I, packed, scales, sf32, group, n0, n1);
}

// ---------------------------------------------------------------- op: rows split over threads
// Work items are chunks of rows handed out dynamically (no barrier inside the call): when one
// thread is descheduled on a busy machine the other takes the remaining chunks.
void int4_matmul(float* out, const float* x, const int32_t* packed, const void* scales,
                 bool scales_f32, int T, int I, int N, int group) {
    if (int4_vnni(I, group, scales_f32)) {
        const size_t qb = int4_q8_bytes(I);
        std::vector<uint8_t> buf((size_t)T * qb + 64);
        uint8_t* base = align64(buf.data());
        std::vector<const void*> xt(T);
        for (int t = 0; t < T; t++) {
            int4_quant_x(base + t * qb, x + (size_t)t * I, I);
            xt[t] = base + t * qb;
        }
        // rows per item: ~256 KiB of weights (L2-resident across token chunks; the kernel's
        // prefetch runs 16+ KiB past an item, so items much smaller would waste bandwidth)
        const int chunk = 4 * ceil_div(ceil_div(1 << 18, I / 2), 4);
        const int items = ceil_div(N, chunk);
        #pragma omp parallel for schedule(dynamic, 1) if (items > 1)
        for (int it = 0; it < items; it++) {
            const int n0 = it * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
            int4_rows_q8(out, N, xt.data(), T, I, packed, (const uint16_t*)scales, group, n0, n1);
        }
        return;
    }
    std::vector<float> xp((size_t)T * I);
    int4_prep_x(xp.data(), x, T, I, group, scales_f32);
    const int block = 16;   // rows per work item; dynamic chunks ride out a busy core
    #pragma omp parallel for schedule(dynamic, 4)
    for (int n0 = 0; n0 < N; n0 += block) {
        int n1 = n0 + block < N ? n0 + block : N;
        int4_rows(out, N, xp.data(), T, I, packed, scales, scales_f32, group, n0, n1);
    }
}
