// FP8 block-scaled matmul: y[T,N] = x[T,I] · W[N,I]ᵀ with W[n,i] = e4m3(w[n,i]) * s[n/bo, i/bi]
// (DeepSeek-V3 / K2 Base+Instruct layout: e4m3fn codes, one float32 scale_inv per bo x bi block).
// The codes are decoded inside the dot product; the dequantized matrix never exists.
//
// The block scale goes on the activations instead of the weights: for a run of rows inside
// one row block rb, xs[t,i] = x[t,i] * s[rb, i/bi] (T·I multiplies, amortized over up to bo
// rows), and each row is then a plain dot product Σ_i xs[t,i] · e4m3(w[n,i]) with fp32
// accumulation. ref rounds e4m3·s, we round x·s: both are one fp32 rounding of the same exact
// product, so results agree with ref to fp32 rounding (NMSE ~1e-14). Any I, N, bo, bi: the
// row loop splits at row-block boundaries and xs handles partial column blocks for free.
//
// Decoding (AVX512-VBMI): every e4m3 value is exact in bf16 (4 significant bits, exponents
// 2^-9..2^8), subnormals and NaN included, so a 128-entry table maps the 7 magnitude bits to
// bf16: vpermi2b looks up the low and the high byte of 64 codes at once (two 64-byte tables
// each, index bit 6 picks the table, bit 7 is ignored), the sign bit is OR'd into the high
// byte, and four masked vpermi2b place (lo, hi) into the top half of each float32 lane, 16
// consecutive columns per vector. NaN codes 0x7F/0xFF decode to NaN, so a row holding one
// yields NaN for every token, as ref (NaN · x = NaN).
#include "common.h"
#include <vector>

// ---------------------------------------------------------------- e4m3fn decode (formats.E4M3)
static float e4m3_value(int c) {
    const int e = (c >> 3) & 15, m = c & 7;
    float mag = (c & 0x7F) == 0x7F ? NAN : e == 0 ? std::ldexp((float)m, -9) : std::ldexp(8.f + m, e - 10);
    return c & 0x80 ? -mag : mag;
}

struct E4M3Table {
    float f[256];
    E4M3Table() {
        for (int c = 0; c < 256; c++) f[c] = e4m3_value(c);
    }
};
static const E4M3Table E4M3;

// xs[t*I + i] = x[t*I + i] * srow[i / bi]
static void scale_x(float* xs, const float* x, int T, int I, const float* srow, int bi) {
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * I;
        float* o = xs + (size_t)t * I;
        for (int i0 = 0, b = 0; i0 < I; i0 += bi, b++) {
            const int i1 = i0 + bi < I ? i0 + bi : I;
            const float s = srow[b];
            #pragma omp simd
            for (int i = i0; i < i1; i++) o[i] = xt[i] * s;
        }
    }
}

// ---------------------------------------------------------------- scalar
// y[t*ldy + n] (= or +=) Σ_{i0 <= i < I} xs[t,i] · e4m3(w[n,i]) for n0 <= n < n1 (w at row n0)
static void fp8_rows_scalar(float* y, int ldy, const float* xs, int T, int I, const uint8_t* w,
                            int nr, int i0, bool add) {
    for (int r = 0; r < nr; r++) {
        const uint8_t* wr = w + (size_t)r * I;
        for (int t = 0; t < T; t++) {
            const float* xt = xs + (size_t)t * I;
            float sum = 0.f;
            for (int i = i0; i < I; i++) sum += xt[i] * E4M3.f[wr[i]];
            float& o = y[(size_t)t * ldy + r];
            o = add ? o + sum : sum;
        }
    }
}

// ---------------------------------------------------------------- AVX-512 VBMI
#if defined(K2_AVX512) && defined(__AVX512VBMI__)
#define K2_FP8_VBMI 1

struct Fp8Lut {
    __m512i lo0, lo1, hi0, hi1;   // bf16 low / high byte of codes 0..63 and 64..127
    __m512i sign;                 // 0x80 in every byte
    __m512i place[4];             // vpermi2b indices: f32 lane j of vector k <- (lo, hi)[16k + j]
};

static Fp8Lut make_lut() {
    alignas(64) uint8_t lo[128], hi[128], idx[4][64];
    for (int c = 0; c < 128; c++) {
        float f = E4M3.f[c];
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((c & 0x7F) == 0x7F) u = 0x7FC00000u;
        lo[c] = (uint8_t)(u >> 16);
        hi[c] = (uint8_t)(u >> 24);
    }
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 16; j++) {
            idx[k][4 * j + 0] = idx[k][4 * j + 1] = 0;       // zeroed by the mask
            idx[k][4 * j + 2] = (uint8_t)(16 * k + j);        // from lo
            idx[k][4 * j + 3] = (uint8_t)(64 + 16 * k + j);   // from hi
        }
    Fp8Lut L;
    L.lo0 = _mm512_load_si512(lo);
    L.lo1 = _mm512_load_si512(lo + 64);
    L.hi0 = _mm512_load_si512(hi);
    L.hi1 = _mm512_load_si512(hi + 64);
    L.sign = _mm512_set1_epi8((char)0x80);
    for (int k = 0; k < 4; k++) L.place[k] = _mm512_load_si512(idx[k]);
    return L;
}

// 64 codes -> 4 x 16 float32 (columns 0-15, 16-31, 32-47, 48-63)
static inline void decode64(const uint8_t* p, const Fp8Lut& L, __m512 f[4]) {
    const __m512i c = _mm512_loadu_si512(p);
    const __m512i lo = _mm512_permutex2var_epi8(L.lo0, c, L.lo1);
    __m512i hi = _mm512_permutex2var_epi8(L.hi0, c, L.hi1);
    hi = _mm512_ternarylogic_epi32(hi, c, L.sign, 0xF8);   // hi | (c & 0x80)
    const __mmask64 top = 0xCCCCCCCCCCCCCCCCull;            // bytes 2, 3 of each lane
    for (int k = 0; k < 4; k++)
        f[k] = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(top, lo, L.place[k], hi));
}

// RB rows x TT tokens: each row's codes are decoded once per 64 columns and used by TT tokens.
// PF: software prefetch into L2 of the same columns two row tiles ahead (>= 16 KiB ahead; past
// the last row too, a prefetch never faults): the hardware prefetchers alone reached ~12 GB/s
// from DRAM vs ~21 GB/s on cached weights, and stop at 4 KiB page ends of mmap'd weights.
template <int RB, int TT, bool PF>
static void fp8_tile(float* y, int ldy, const float* xs, int I, const uint8_t* w, const Fp8Lut& L) {
    const size_t PFD = 2 * RB * (size_t)I > 16384 ? 2 * RB * (size_t)I : 16384;
    __m512 acc[RB][TT];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) acc[r][t] = _mm512_setzero_ps();
    const int I64 = I / 64 * 64;
    for (int i = 0; i < I64; i += 64) {
        for (int r = 0; r < RB; r++) {
            __m512 f[4];
            if (PF) _mm_prefetch((const char*)(w + (size_t)r * I + i + PFD), _MM_HINT_T1);
            decode64(w + (size_t)r * I + i, L, f);
            for (int t = 0; t < TT; t++) {
                const float* xt = xs + (size_t)t * I + i;
                for (int k = 0; k < 4; k++)
                    acc[r][t] = _mm512_fmadd_ps(f[k], _mm512_loadu_ps(xt + 16 * k), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TT; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int RB>
static void fp8_tiles(float* y, int ldy, const float* xs, int T, int I, const uint8_t* w, const Fp8Lut& L) {
    for (int t0 = 0; t0 < T; t0 += 4) {      // token tiles of <= 4; the RB rows stay in cache
        const float* xt = xs + (size_t)t0 * I;
        float* yt = y + (size_t)t0 * ldy;
        const bool pf = t0 == 0;              // prefetch during the first token tile only
        switch ((T - t0 < 4 ? T - t0 : 4) + 4 * pf) {
            case 1: fp8_tile<RB, 1, false>(yt, ldy, xt, I, w, L); break;
            case 2: fp8_tile<RB, 2, false>(yt, ldy, xt, I, w, L); break;
            case 3: fp8_tile<RB, 3, false>(yt, ldy, xt, I, w, L); break;
            case 4: fp8_tile<RB, 4, false>(yt, ldy, xt, I, w, L); break;
            case 5: fp8_tile<RB, 1, true>(yt, ldy, xt, I, w, L); break;
            case 6: fp8_tile<RB, 2, true>(yt, ldy, xt, I, w, L); break;
            case 7: fp8_tile<RB, 3, true>(yt, ldy, xt, I, w, L); break;
            default: fp8_tile<RB, 4, true>(yt, ldy, xt, I, w, L); break;
        }
    }
}
#endif

// nr rows at w (one row block: xs already scaled) into y[t*ldy + r]
static void fp8_run(float* y, int ldy, const float* xs, int T, int I, const uint8_t* w, int nr) {
#ifdef K2_FP8_VBMI
    static const Fp8Lut L = make_lut();
    int r = 0;
    for (; r + 4 <= nr; r += 4) fp8_tiles<4>(y + r, ldy, xs, T, I, w + (size_t)r * I, L);
    for (; r < nr; r++) fp8_tiles<1>(y + r, ldy, xs, T, I, w + (size_t)r * I, L);
    if (I % 64) fp8_rows_scalar(y, ldy, xs, T, I, w, nr, I / 64 * 64, true);
#else
    fp8_rows_scalar(y, ldy, xs, T, I, w, nr, 0, false);
#endif
}

void fp8_rows(float* y, int ldy, const float* x, int T, int I, const uint8_t* w, const float* scale_inv,
              int bo, int bi, int n0, int n1) {
    const int TC = 16;   // tokens per pass: xs (TC·I floats per thread) stays in L2
    static thread_local std::vector<float> buf;
    const int tc = T < TC ? T : TC;
    if (buf.size() < (size_t)tc * I) buf.resize((size_t)tc * I);
    const int nbi = ceil_div(I, bi);
    for (int n = n0; n < n1;) {
        const int rb = n / bo, e = (int64_t)(rb + 1) * bo < n1 ? (rb + 1) * bo : n1;   // rows n..e-1: one block
        for (int t0 = 0; t0 < T; t0 += TC) {
            const int nt = T - t0 < TC ? T - t0 : TC;
            scale_x(buf.data(), x + (size_t)t0 * I, nt, I, scale_inv + (size_t)rb * nbi, bi);
            fp8_run(y + (size_t)t0 * ldy + n, ldy, buf.data(), nt, I, w + (size_t)n * I, e - n);
        }
        n = e;
    }
}

// ---------------------------------------------------------------- op: rows split over threads
void fp8_matmul(float* out, const float* x, const uint8_t* w, const float* scale_inv, int T, int I,
                int N, int bo, int bi) {
    // work item: R rows inside one row block (~512 KiB of codes, a multiple of 4 rows), so an
    // item scales x once; dynamic scheduling rides out a busy core, no barriers
    if (N <= 0 || T <= 0) return;
    int R = (512 << 10) / (I > 0 ? I : 1);
    R = R < 16 ? 16 : R / 4 * 4;
    if (bo > N) bo = N;   // for the item layout only: then every row lies in block 0
    if (R > bo) R = bo;
    const int per_block = ceil_div(bo, R), nblocks = ceil_div(N, bo);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < nblocks * per_block; it++) {
        const int rb = it / per_block, sub = it % per_block;
        const int n0 = rb * bo + sub * R;
        int n1 = n0 + R < (rb + 1) * bo ? n0 + R : (rb + 1) * bo;
        if (n1 > N) n1 = N;
        if (n0 < n1) fp8_rows(out, N, x, T, I, w, scale_inv, bo, bi, n0, n1);
    }
}
