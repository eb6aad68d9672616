// Absorbed MLA decode over the paged latent cache (docs/architecture.md#mla-absorbed, docs/kv-cache.md#mla-decode): per sequence b and head h,
// u[b,h] = Σ_t softmax_t(scale·(q_latent·c_t + q_pe·k_pe_t)) · c_t, t < lengths[b].
// Softmax is fp32 and streaming (running max m, running sum l, rescaled accumulator).
//
// The cache rows are float32, bf16 bits or int8 codes with per-token scales (common.h KvDtype).
// At depth this op is compute-bound (64 heads x (576 + 512) MACs per cached token, ~20x the
// time to read a bf16 row), so the rows are multiplied in their own width:
//   bf16 rows: vdpbf16ps (32 MACs per instruction, twice an fp32 FMA) with the query and the
//     probabilities rounded to bf16, as a GPU runs MLA (FlashMLA);
//   int8 rows: vpdpbusd (64 MACs) with the query quantized per head (unsigned codes + 128, the
//     offset taken back with the row's stored code sum) and, for P·c, the probabilities times
//     the rows' scales quantized to uint8 per (head, 128-token block) against the block's max;
//   float32 rows (and bf16 in exact mode): fp32 FMAs, as ref to rounding.
// Every sum is formed in one order whatever the thread count: each score in one accumulator
// (fp32 paths: fixed 4x4 register tiles), P·c over the tokens in order, and a long sequence is
// cut into ranges of KVC tokens at fixed positions (split-KV: each range's (m, l, acc) partial,
// merged in range order), so threads only decide which items run where (ranges, or head chunks
// when there are few).
//
// AVX-512: an item walks its range in blocks of BS tokens (in L2, the next block prefetched) and
// all heads of the item visit each block. The dot-product paths (run_item_dp), where one cached
// row feeds all 64 heads (a small GEMM, M = heads): (1) scores with HEADS in the lanes: a
// broadcast dword of a row (2 bf16 / 4 int8 adjacent columns) times the transposed query, in
// 6-token x 64-head register tiles (24 accumulators; each step 4 query loads and 6 broadcasts
// feed 24 dot products; no horizontal sums), written [token][head]; (2) online softmax on head
// vectors (a cheaper exp, exp_p), P packed as dwords of 2 / 4 tokens of one head; (3) P·c per
// 64-column slice of the block: the slice interleaved once (adjacent elements = 2 / 4 tokens of
// one column; 8 / 16 KB, kept in L1), then 4-head x 64-column register tiles for every head
// quad over it. On Zen 4 both products run near one 512-bit dot-product instruction per cycle
// (bf16 ~100%, int8 ~90-95%); the rest (softmax, interleave, partials, prefetch stalls) is
// ~12% (bf16) / ~15% (int8) of the time at depth.
// The fp32 paths (run_item): 4-head x 4-token score tiles with lanes along the row (one
// horizontal-sum tree per tile), then the same softmax and P·c tiles with fp32 FMAs.
// Elsewhere: the portable loops, work items (sequence, chunk of 8 heads), int8 rows widened.
#include "common.h"
#include <type_traits>
#include <vector>
#include <algorithm>

#ifdef K2_AVX512
#if defined(K2_BF16DP) && defined(__AVX512VNNI__)
#define K2_MLA_DP 1
#endif
namespace {

const int BS = 128;    // tokens per block
const int HQ = 4;      // heads per register tile (fp32 paths; P·c of all paths)
const int HG = 16;     // heads per vector (the dot-product paths' score tiles)
// Tokens per split-KV range (a multiple of BS; fixed: results never depend on it). Each range
// ends in a partial (acc [H][C] written, read back by the merge: ~128 KB each for K2) and
// starts on rows not yet prefetched: 2048 halves that traffic against 1024 (~5% at 32K).
const int KVC = 2048;

// Lane i of the result = the sum of v[i]'s 16 lanes.
inline __m512 hsum16(const __m512* v) {
    __m512 x[8], z[4];
    for (int k = 0; k < 8; k++)   // lane pairs: v[2k] at even, v[2k+1] at odd positions
        x[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) { // element e of each 128-bit lane: v[4k+e]'s sum over that lane
        const __m512d a = _mm512_castps_pd(x[2 * k]), b = _mm512_castps_pd(x[2 * k + 1]);
        z[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of a 4x4 tile, lane 4i+j (head i, token j), to rows of S (BS apart).
inline void store_tile(float* s, __m512 r) {
    _mm_storeu_ps(s, _mm512_extractf32x4_ps(r, 0));
    _mm_storeu_ps(s + BS, _mm512_extractf32x4_ps(r, 1));
    _mm_storeu_ps(s + 2 * BS, _mm512_extractf32x4_ps(r, 2));
    _mm_storeu_ps(s + 3 * BS, _mm512_extractf32x4_ps(r, 3));
}

// 16 cache elements from p as fp32 (m: which; the rest zero): float32 rows, or bf16 bits
// (in exact mode a bf16 block is widened once into scratch rows, not in the tiles, which
// every head quad runs over each row again).
inline __m512 load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(__mmask16 m, const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Row i of a 4x4 register tile (named accumulators aij: gcc 12 stores an array of them to the
// stack on every step, 1.6x slower): aij = OP(aij, v, xj), j < 4.
#define K2_ROW4(OP, i, v)                                                                          \
    {                                                                                              \
        const auto v_ = (v);                                                                       \
        a##i##0 = OP(a##i##0, v_, x0);                                                             \
        a##i##1 = OP(a##i##1, v_, x1);                                                             \
        a##i##2 = OP(a##i##2, v_, x2);                                                             \
        a##i##3 = OP(a##i##3, v_, x3);                                                             \
    }
#define K2_TILE_DECL(T, zero)                                                                      \
    T a00 = zero, a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;     \
    T a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
#define K2_TILE_ARRAY {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33}
inline __m512 fma_(__m512 a, __m512 v, __m512 x) { return _mm512_fmadd_ps(v, x, a); }

// s[i*BS + j] = scale · q_i·row_j for 4 heads (q rows Wp apart, zero past W) x 4 rows of W
// elements; the rows are not padded: the last step's masked loads stay inside them.
inline void score_tile(float* s, const float* q, int Wp, const float* const* row, int W, float scale) {
    const float *r0 = row[0], *r1 = row[1], *r2 = row[2], *r3 = row[3];
    K2_TILE_DECL(__m512, _mm512_setzero_ps())
    for (int c = 0; c < W; c += 16) {
        const __mmask16 m = W - c >= 16 ? 0xFFFF : (__mmask16)((1u << (W - c)) - 1);
        const __m512 x0 = load16(m, r0 + c), x1 = load16(m, r1 + c);
        const __m512 x2 = load16(m, r2 + c), x3 = load16(m, r3 + c);
#define K2_QK_HEAD(i) K2_ROW4(fma_, i, _mm512_load_ps(q + (size_t)i * Wp + c))
        K2_QK_HEAD(0) K2_QK_HEAD(1) K2_QK_HEAD(2) K2_QK_HEAD(3)
#undef K2_QK_HEAD
    }
    const __m512 a[16] = K2_TILE_ARRAY;
    store_tile(s, _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
}

// acc[i][c0..c0+64) = acc·corr[i] + Σ_{j<nb} p[i*BS + j] · row_j[c0..c0+64) for 4 heads
// (acc rows Cp apart); m masks the columns past C (loaded as zeros).
inline void pv_tile(float* acc, int Cp, const float* p, const float* corr, const float* const* row, int nb,
                    int c0, const __mmask16* m) {
    K2_TILE_DECL(__m512, _mm512_setzero_ps())
    for (int j = 0; j < nb; j++) {
        const float* r = row[j] + c0;
        const __m512 x0 = load16(m[0], r), x1 = load16(m[1], r + 16);
        const __m512 x2 = load16(m[2], r + 32), x3 = load16(m[3], r + 48);
#define K2_PV_HEAD(i) K2_ROW4(fma_, i, _mm512_set1_ps(p[i * BS + j]))
        K2_PV_HEAD(0) K2_PV_HEAD(1) K2_PV_HEAD(2) K2_PV_HEAD(3)
#undef K2_PV_HEAD
    }
    const __m512 a[16] = K2_TILE_ARRAY;
    for (int k = 0; k < 16; k++) {
        float* ak = acc + (size_t)(k / 4) * Cp + c0 + 16 * (k % 4);
        _mm512_store_ps(ak, _mm512_fmadd_ps(_mm512_load_ps(ak), _mm512_set1_ps(corr[k / 4]), a[k]));
    }
}

#ifdef K2_MLA_DP
inline __m512 dpbf16_(__m512 a, __m512i v, __m512i x) { return _mm512_dpbf16_ps(a, (__m512bh)v, (__m512bh)x); }
// a += Σ_4 v.u8 · x.s8 per dword. Inline asm: gcc 12 copies every accumulator of a tile to a
// fresh register around each _mm512_dpbusd_epi32 (and spills), 1.5x slower.
inline __m512i dpbusd_(__m512i a, __m512i v, __m512i x) {
    asm("vpdpbusd %2, %1, %0" : "+v"(a) : "v"(v), "vm"(x));
    return a;
}

// The dot-product paths' score tiles put HEADS in the lanes: all heads of an item multiply the
// same cached rows (it is a small GEMM, M = heads), so one broadcast dword of a row (2 bf16 or
// 4 int8 adjacent columns of one token) feeds NG dot products against the transposed query
// qt[k][head] (the same 2 / 4 columns of 16 heads a vector, prep_query). Each of the N x NG
// accumulators holds finished scores: no horizontal sums, no interleaved copy of the rows, and
// the scores come out [token][head], the layout the softmax runs on (lanes = heads).
// NT tokens x 4 head vectors = 24 accumulators + 4 query vectors + 1 broadcast: 29 of 32 zmm.
const int NT = 6;    // tokens per score tile (fewer in the last tile of a block)

inline uint32_t load_u32(const char* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// bf16 rows: s[t*ss + 16g + i] = scale · Σ_k qt[k*Hq + 16g + i] · row_t[2k, 2k+1] for N tokens and
// NG head vectors, k < ceil(W/2) in order (one fp32 accumulator per score); an odd W's last pair
// is read as one element (the next one may lie past the pool).
template <int NG, int N>
inline void score_ht_bf16(float* s, int ss, const uint32_t* qt, int Hq, const char* const* row, int W, float scale) {
    __m512 a[N][NG];
    for (int t = 0; t < N; t++)
        for (int g = 0; g < NG; g++) a[t][g] = _mm512_setzero_ps();
    const int K = W / 2;
    auto step = [&](const uint32_t* qk, auto rowval) {
        __m512i q[NG];
        for (int g = 0; g < NG; g++) q[g] = _mm512_load_si512(qk + 16 * g);
        for (int t = 0; t < N; t++) {
            const __m512i x = _mm512_set1_epi32((int)rowval(row[t]));
            for (int g = 0; g < NG; g++) a[t][g] = dpbf16_(a[t][g], q[g], x);
        }
    };
    for (int k = 0; k < K; k++) step(qt + (size_t)k * Hq, [k](const char* r) { return load_u32(r + 4 * k); });
    if (W & 1) {
        step(qt + (size_t)K * Hq, [K](const char* r) {
            uint16_t v;
            std::memcpy(&v, r + 4 * K, 2);
            return (uint32_t)v;
        });
    }
    const __m512 sv = _mm512_set1_ps(scale);
    for (int t = 0; t < N; t++)
        for (int g = 0; g < NG; g++) _mm512_store_ps(s + (size_t)t * ss + 16 * g, _mm512_mul_ps(a[t][g], sv));
}

// int8 rows, the same tiles over integer dot products: a[t][g] = a0[t] + Σ_{k<nk} qt[k] · row_t
// bytes [off + 4k, +4) (unsigned query codes, signed row codes; exact in int32).
template <int NG, int N>
inline void dot_ht_q8(__m512i (&a)[N][NG], const int32_t* a0, const uint32_t* qt, int Hq, const char* const* row,
                      int off, int nk) {
    for (int t = 0; t < N; t++)
        for (int g = 0; g < NG; g++) a[t][g] = _mm512_set1_epi32(a0[t]);
    for (int k = 0; k < nk; k++) {
        __m512i q[NG];
        for (int g = 0; g < NG; g++) q[g] = _mm512_load_si512(qt + (size_t)k * Hq + 16 * g);
        for (int t = 0; t < N; t++) {
            const __m512i x = _mm512_set1_epi32((int)load_u32(row[t] + off + 4 * k));
            for (int g = 0; g < NG; g++) a[t][g] = dpbusd_(a[t][g], q[g], x);
        }
    }
}

// s[t*ss + 16g + i] = (σ_c,i · s_c,t) · (dot_c - 128·Σc_t) + (σ_r,i · s_r,t) · (dot_r - 128·Σr_t), σ the
// query's scales times the softmax scale, the 128s taking back the query codes' offset (the
// accumulators start at -128·Σ). The latent quads k < kc are qt's first kc rows; the rope quads
// [kr0, kr1) of the row (a quad across C holds both parts: each part's query codes are zero in
// the other's columns) its next rows. qs: σ_c of the tile's heads, σ_r at qs + Hq; tok: the
// tile's first token's s_c, then s_r, -128·Σc, -128·Σr (int32) BS apart.
template <int NG, int N>
inline void score_ht_q8(float* s, int ss, const uint32_t* qt, int Hq, const char* const* row, int kc, int kr0,
                        int kr1, const float* qs, const float* tok) {
    __m512i a[N][NG];
    dot_ht_q8<NG, N>(a, (const int32_t*)(tok + 2 * BS), qt, Hq, row, 0, kc);
    for (int t = 0; t < N; t++)
        for (int g = 0; g < NG; g++) {
            const __m512 hs = _mm512_mul_ps(_mm512_load_ps(qs + 16 * g), _mm512_set1_ps(tok[t]));
            _mm512_store_ps(s + (size_t)t * ss + 16 * g, _mm512_mul_ps(hs, _mm512_cvtepi32_ps(a[t][g])));
        }
    dot_ht_q8<NG, N>(a, (const int32_t*)(tok + 3 * BS), qt + (size_t)kc * Hq, Hq, row, 4 * kr0, kr1 - kr0);
    for (int t = 0; t < N; t++)
        for (int g = 0; g < NG; g++) {
            const __m512 hs = _mm512_mul_ps(_mm512_load_ps(qs + Hq + 16 * g), _mm512_set1_ps(tok[BS + t]));
            float* st = s + (size_t)t * ss + 16 * g;
            _mm512_store_ps(st, _mm512_fmadd_ps(hs, _mm512_cvtepi32_ps(a[t][g]), _mm512_load_ps(st)));
        }
}

// One 64-column slice [c0, c0 + 64) of the block interleaved: X[g][v] (64 bytes each) for token
// group g (2 bf16 / 4 int8 tokens) and vector v < 4: dword j of vector v holds the group's
// tokens of column c0 + 16v + j (zero past C). A slice (8 KB int8, 16 KB bf16) is made just
// before its P·c tiles and stays in L1 for all of them (a whole interleaved block would not fit:
// its stores would go to L2).
inline void interleave_bf16(__m512i* X, const char* const* row, int nb, int C, int c0) {
    for (int g = 0; g < (nb + 1) / 2; g++) {
        const uint16_t* ra = (const uint16_t*)row[2 * g];
        const uint16_t* rb = 2 * g + 1 < nb ? (const uint16_t*)row[2 * g + 1] : nullptr;
        for (int v = 0; v < 4; v += 2) {
            const int c = c0 + 16 * v, left = C - c;
            const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : left <= 0 ? 0 : (__mmask32)((1u << left) - 1);
            const __m512i a = _mm512_maskz_loadu_epi16(m, ra + c);
            const __m512i b = rb ? _mm512_maskz_loadu_epi16(m, rb + c) : _mm512_setzero_si512();
            const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
            // lo's 128-bit lanes hold columns 8L..8L+3, hi's 8L+4..8L+7: back to column order
            X[(size_t)g * 4 + v] = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi);
            X[(size_t)g * 4 + v + 1] = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), hi);
        }
    }
}

inline void interleave_q8(__m512i* X, const char* const* row, int nb, int C, int c0) {
    const int left = C - c0;
    const __mmask64 m = left >= 64 ? ~0ull : (__mmask64)((1ull << left) - 1);
    for (int g = 0; g < (nb + 3) / 4; g++) {
        __m512i r[4];
        for (int j = 0; j < 4; j++)
            r[j] = 4 * g + j < nb ? _mm512_maskz_loadu_epi8(m, row[4 * g + j] + c0) : _mm512_setzero_si512();
        const __m512i lo01 = _mm512_unpacklo_epi8(r[0], r[1]), hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
        const __m512i lo23 = _mm512_unpacklo_epi8(r[2], r[3]), hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
        // vector v's 128-bit lane L: columns 16L + 4v .. +3; a 4x4 transpose of the lanes puts
        // the columns back in order
        const __m512i x0 = _mm512_unpacklo_epi16(lo01, lo23), x1 = _mm512_unpackhi_epi16(lo01, lo23);
        const __m512i x2 = _mm512_unpacklo_epi16(hi01, hi23), x3 = _mm512_unpackhi_epi16(hi01, hi23);
        const __m512i t0 = _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i t1 = _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i t2 = _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i t3 = _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 2, 3, 2));
        __m512i* x = X + (size_t)g * 4;
        x[0] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
        x[1] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
        x[2] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));
        x[3] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

// acc[i][c0..c0+64) = acc·corr[i] + Σ_g P_i[g] · X[g][..] for 4 heads over the slice X of
// columns c0.. (interleave_bf16): head i's bf16 P pair of token group g at p[g*ps + i].
inline void pv_tile_bf16(float* acc, int Cp, const uint32_t* p, int ps, const float* corr, const __m512i* X,
                         int ng, int c0) {
    K2_TILE_DECL(__m512, _mm512_setzero_ps())
    for (int g = 0; g < ng; g++) {
        const __m512i* xg = X + (size_t)g * 4;
        const __m512i x0 = xg[0], x1 = xg[1], x2 = xg[2], x3 = xg[3];
        const uint32_t* pp = p + (size_t)g * ps;
#define K2_PV_HEAD(i) K2_ROW4(dpbf16_, i, _mm512_set1_epi32((int)pp[i]))
        K2_PV_HEAD(0) K2_PV_HEAD(1) K2_PV_HEAD(2) K2_PV_HEAD(3)
#undef K2_PV_HEAD
    }
    const __m512 a[16] = K2_TILE_ARRAY;
    for (int q = 0; q < 16; q++) {
        float* aq = acc + (size_t)(q / 4) * Cp + c0 + 16 * (q % 4);
        _mm512_store_ps(aq, _mm512_fmadd_ps(_mm512_load_ps(aq), _mm512_set1_ps(corr[q / 4]), a[q]));
    }
}

// The same over int8 X (4 tokens a dword) with uint8 P quads; sb[i]: head i's P scale.
inline void pv_tile_q8(float* acc, int Cp, const uint32_t* p, int ps, const float* corr, const float* sb,
                       const __m512i* X, int ng, int c0) {
    K2_TILE_DECL(__m512i, _mm512_setzero_si512())
    for (int g = 0; g < ng; g++) {
        const __m512i* xg = X + (size_t)g * 4;
        const __m512i x0 = xg[0], x1 = xg[1], x2 = xg[2], x3 = xg[3];
        const uint32_t* pp = p + (size_t)g * ps;
#define K2_PV_HEAD(i) K2_ROW4(dpbusd_, i, _mm512_set1_epi32((int)pp[i]))
        K2_PV_HEAD(0) K2_PV_HEAD(1) K2_PV_HEAD(2) K2_PV_HEAD(3)
#undef K2_PV_HEAD
    }
    const __m512i a[16] = K2_TILE_ARRAY;
    for (int q = 0; q < 16; q++) {
        float* aq = acc + (size_t)(q / 4) * Cp + c0 + 16 * (q % 4);
        _mm512_store_ps(aq, _mm512_fmadd_ps(_mm512_load_ps(aq), _mm512_set1_ps(corr[q / 4]),
                                            _mm512_mul_ps(_mm512_cvtepi32_ps(a[q]), _mm512_set1_ps(sb[q / 4]))));
    }
}
#endif

enum Mode { M_F32, M_BF16W, M_BF16DP, M_Q8 };

// slot < 0: whole sequence, written to out; else range k of the sequence's nr (slots slot - k ..)
struct Item { int b, h0, h1, t0, t1, slot, k, nr; };

struct Args {
    float* out; const float* q_latent; const float* q_pe; const char* pool; const int32_t* page_table;
    int H, C, R, page, max_pages, row_bytes; float scale;
    const uint32_t* qprep; const float* qscale; int Hp;   // prep_query's, [B][..][Hp] heads
    // partials: per sequence (its first slot s0, nr ranges) acc at s0·H·C as [H][nr][C], so that the
    // merge reads each head's ranges in one stream; per slot m [H] then l [H]
    float* part_acc; float* part_ml;
};

// Per-thread scratch, kept between calls: O(H·(C+R) + BS·(C+R)), independent of the context.
struct Scratch {
    std::vector<float> f;
    std::vector<float> x;              // an interleaved slice (bf16 / int8 modes), 64-byte aligned
    std::vector<const char*> rows;     // this block's rows, the next's
    std::vector<const float*> frows;   // this block's as float32 rows (M_F32, M_BF16W)
    std::vector<float> wide;           // M_BF16W: [BS][Wp] widened
};

// Dword columns of the prepared query (M_BF16DP: pairs of elements; M_Q8: the latent's quads,
// then the rope key's, which start at quad C/4).
inline int qt_rows(int M, int C, int R) {
    return M == M_BF16DP ? ceil_div(C + R, 2) : ceil_div(C, 4) + ceil_div(C + R, 4) - C / 4;
}

// Head slot i (< Hp, the heads rounded up to HG; zero past H) of sequence b's query, transposed
// for the score tiles: qt[k*Hp] = dword column k (qt = qprep + b·qt_rows·Hp + i). M_BF16DP:
// elements 2k, 2k+1 as bf16. M_Q8: codes round(q / s) + 128 (unsigned for vpdpbusd,
// s = absmax / 127, the latent and the rope key each their own) of columns 4k..4k+3 of its part,
// 0 for columns outside it (so they add nothing), and s·scale (the softmax's) of each part at
// qs[0], qs[Hp].
// Prepared once per call, not per item.
template <int M>
void prep_query(uint32_t* qt, float* qs, const Args& A, int b, int i) {
    const int C = A.C, R = A.R, W = C + R, Hp = A.Hp;
    // the head's row [q_latent | q_pe] in x, zero past W (all zero for a padding head); the
    // dword columns in d, then written out transposed (vector code, ~30 us a call less for K2)
    static thread_local std::vector<float> xb;
    static thread_local std::vector<uint32_t> db;
    const int Wx = ceil_div(W, 64) * 64 + 16;
    if ((int)xb.size() < Wx) xb.resize(Wx), db.resize(Wx);
    float* x = xb.data();
    uint32_t* d = db.data();
    std::fill(x, x + Wx, 0.f);
    if (i < A.H) {
        std::memcpy(x, A.q_latent + ((size_t)b * A.H + i) * C, sizeof(float) * C);
        std::memcpy(x + C, A.q_pe + ((size_t)b * A.H + i) * R, sizeof(float) * R);
    }
    int nd = 0;
    if (M == M_BF16DP) {   // pairs rounded to bf16 (vcvtne2ps2bf16: nearest even, as P)
        nd = ceil_div(W, 2);
        for (int k = 0; k < nd; k += 16)
            _mm512_storeu_si512(d + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 2 * k + 16),
                                                                      _mm512_loadu_ps(x + 2 * k)));
    } else {
        for (int part = 0; part < 2; part++) {
            const int c0 = part ? C : 0, c1 = part ? W : C;   // the part's columns
            __m512 mx = _mm512_setzero_ps();
            for (int c = c0; c < c1; c += 16) {
                const __mmask16 m = c1 - c >= 16 ? 0xFFFF : (__mmask16)((1u << (c1 - c)) - 1);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + c)));
            }
            const float amax = _mm512_reduce_max_ps(mx);
            const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            uint8_t* u = (uint8_t*)(d + nd);   // bytes of columns 4·(c0/4) ..; 0 outside the part
            const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            for (int c = c0 / 4 * 4; c < ceil_div(c1, 4) * 4; c += 16) {
                const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(c), lane);
                const __mmask16 in = _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(c0)) &
                                     _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32(c1));
                const __m512i code = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inv)),
                                                      _mm512_set1_epi32(128));   // round to nearest, as nearbyint
                _mm_storeu_si128((__m128i*)(u + c - c0 / 4 * 4), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(in, code)));
            }
            nd += ceil_div(c1, 4) - c0 / 4;
            qs[part * Hp] = amax / 127.f * A.scale;
        }
    }
    for (int k = 0; k < nd; k++) qt[(size_t)k * Hp] = d[k];
}

// Item prologue and epilogue shared by both paths: this item's m, l, acc start empty; at the end
// u = acc / l to out, or the (m, l, acc) partial of its range to its slot.
inline void item_start(float* acc, float* m, float* l, int nhp, int Cp) {
    std::fill(m, m + nhp, -INFINITY);
    std::fill(l, l + nhp, 0.f);
    std::fill(acc, acc + (size_t)nhp * Cp, 0.f);
}

inline void item_finish(const Args& A, const Item& it, const float* acc, int Cp, const float* m, const float* l) {
    const int nh = it.h1 - it.h0, C = A.C, H = A.H;
    for (int i = 0; i < nh; i++) {
        const int h = it.h0 + i;
        const float* ai = acc + (size_t)i * Cp;
        float* o;
        float f = 1.f;
        if (it.slot < 0) {
            f = l[i] > 0.f ? 1.f / l[i] : 0.f;   // length 0 -> zeros
            o = A.out + ((size_t)it.b * H + h) * C;
        } else {
            o = A.part_acc + (((size_t)(it.slot - it.k) * H + (size_t)h * it.nr + it.k) * C);
            A.part_ml[(size_t)it.slot * 2 * H + h] = m[i];
            A.part_ml[(size_t)it.slot * 2 * H + H + h] = l[i];
            if (C % 16 == 0 && ((uintptr_t)o & 63) == 0) {
                // the merge reads it only after every item, from memory anyway: streaming stores
                // spare the read-for-ownership of lines long evicted by the rows
                for (int c = 0; c < C; c += 16) _mm512_stream_ps(o + c, _mm512_load_ps(ai + c));
                continue;
            }
        }
        for (int c = 0; c < C; c++) o[c] = ai[c] * f;
    }
    _mm_sfence();   // the streamed partials visible before the merge
}

// The rows of tokens [t0, min(t0 + BS, it.t1)) of the item's sequence; returns their count.
inline int block_rows(const char** r, const Args& A, const Item& it, int t0) {
    const int32_t* pt = A.page_table + (size_t)it.b * A.max_pages;
    const int nb = std::min(BS, it.t1 - t0);
    for (int j = 0; j < nb; j++) {
        const int t = t0 + j;
        r[j] = A.pool + ((size_t)pt[t / A.page] * A.page + t % A.page) * A.row_bytes;
    }
    return nb;
}

// Rows r[j0, j1) into L2 (the next block's, scattered pages, spread over this block's tiles).
inline void prefetch_rows(const char* const* r, int j0, int j1, int row_bytes) {
    for (int j = j0; j < j1; j++) {
        for (int o = 0; o < row_bytes; o += 64) _mm_prefetch(r[j] + o, _MM_HINT_T1);
        _mm_prefetch(r[j] + row_bytes - 1, _MM_HINT_T1);
    }
}

// float32 and widened bf16 rows (M_F32, M_BF16W): fp32 FMAs in 4-head x 4-token score tiles
// (lanes along the row, one horizontal-sum tree per tile) and 4-head x 64-column P·c tiles.
template <int M>
void run_item(const Args& A, const Item& it) {
    const int C = A.C, R = A.R, W = C + R;
    const int Wp = ceil_div(W, 16) * 16, Cp = ceil_div(C, 64) * 64;
    const int nh = it.h1 - it.h0, nhp = ceil_div(nh, HQ) * HQ;
    static thread_local Scratch sc;
    const size_t qfloats = (size_t)nhp * Wp;
    const size_t need = qfloats + (size_t)nhp * (Cp + BS + 3) + 64;
    if (sc.f.size() < need) sc.f.resize(need);
    if (sc.rows.size() < 2 * BS) sc.rows.resize(2 * BS), sc.frows.resize(BS);
    float* qc = align64(sc.f.data());             // the query as float32 [nhp][Wp]
    float* acc = align64(qc + qfloats);           // [nhp][Cp]
    float* S = acc + (size_t)nhp * Cp;            // [nhp][BS] scores, then P
    float* m = S + (size_t)nhp * BS;
    float* l = m + nhp;
    float* corr = l + nhp;
    for (int i = 0; i < nhp; i++) {
        const int h = it.h0 + i;
        float* qi = qc + (size_t)i * Wp;
        std::fill(qi, qi + Wp, 0.f);
        if (i < nh) {
            std::memcpy(qi, A.q_latent + ((size_t)it.b * A.H + h) * C, sizeof(float) * C);
            std::memcpy(qi + C, A.q_pe + ((size_t)it.b * A.H + h) * R, sizeof(float) * R);
        }
    }
    item_start(acc, m, l, nhp, Cp);
    const char** cur = sc.rows.data();
    const char** nxt = cur + BS;
    const int nq = nhp / HQ;
    int nb = it.t1 > it.t0 ? block_rows(cur, A, it, it.t0) : 0;
    if (M == M_BF16W && sc.wide.size() < (size_t)BS * Wp) sc.wide.resize((size_t)BS * Wp);
    for (int t0 = it.t0; t0 < it.t1; t0 += BS) {
        const int nb4 = ceil_div(nb, 4) * 4;   // 4-row score tiles: the last row repeated as padding
        for (int j = nb; j < nb4; j++) cur[j] = cur[nb - 1];
        for (int j = 0; j < nb4; j++) {
            if (M == M_F32) {
                sc.frows[j] = (const float*)cur[j];
            } else {
                float* w = sc.wide.data() + (size_t)j * Wp;
                for (int c = 0; c < W; c += 16) {
                    const __mmask16 k = W - c >= 16 ? 0xFFFF : (__mmask16)((1u << (W - c)) - 1);
                    _mm512_mask_storeu_ps(w + c, k, load16(k, (const uint16_t*)cur[j] + c));
                }
                sc.frows[j] = w;
            }
        }
        const int nbn = t0 + BS < it.t1 ? block_rows(nxt, A, it, t0 + BS) : 0;
        for (int i = 0; i < nhp; i += HQ) {
            for (int j = 0; j < nb4; j += 4)
                score_tile(S + (size_t)i * BS + j, qc + (size_t)i * Wp, Wp, sc.frows.data() + j, W, A.scale);
            prefetch_rows(nxt, nbn * (i / HQ) / nq, nbn * (i / HQ + 1) / nq, A.row_bytes);
        }
        for (int i = 0; i < nhp; i++) {   // online softmax; S becomes P (zeros past nb)
            float* s = S + (size_t)i * BS;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < nb; j += 16) {
                const __mmask16 k = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
                mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, k, s + j));
            }
            const float mn = std::max(m[i], _mm512_reduce_max_ps(mx));
            corr[i] = std::exp(m[i] - mn);   // 0 on the first block
            const __m512 mv = _mm512_set1_ps(mn);
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < BS; j += 16) {
                const __mmask16 k = nb - j >= 16 ? 0xFFFF : nb - j <= 0 ? 0 : (__mmask16)((1u << (nb - j)) - 1);
                const __m512 p = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
                _mm512_storeu_ps(s + j, p);
                sum = _mm512_add_ps(sum, p);
            }
            l[i] = l[i] * corr[i] + _mm512_reduce_add_ps(sum);
            m[i] = mn;
        }
        for (int i = 0; i < nhp; i += HQ)
            for (int c0 = 0; c0 < C; c0 += 64) {
                __mmask16 cm[4];   // columns past C
                for (int k = 0; k < 4; k++) {
                    const int left = C - c0 - 16 * k;
                    cm[k] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                }
                pv_tile(acc + (size_t)i * Cp, Cp, S + (size_t)i * BS, corr + i, sc.frows.data(), nb, c0, cm);
            }
        std::swap(cur, nxt);
        nb = nbn;
    }
    item_finish(A, it, acc, Cp, m, l);
}

#ifdef K2_MLA_DP
// e^x for x <= 0 as 2^(x·log2 e): n = round, 2^f (|f| <= 1/2) by its Taylor polynomial of degree
// 5 (relative error < 4e-6, plus ~|x|·1e-7 from rounding x·log2 e: far below the bf16 / uint8
// rounding of P; the same p enters P and l), scaled by 2^n. 9 vector ops against exp512's 14.
inline __m512 exp_p(__m512 x) {
    x = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);   // (ln 2)^k / k!
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

// The score tiles of one block for head vectors [g0, g0 + NG): NT tokens a tile, the block's
// last tile narrower.
template <int M, int NG, int N>
inline void score_tile_dp(const Args& A, float* S, int ss, const uint32_t* qt, int Hq, const char* const* row,
                          const float* qs, const float* tok) {
    if (M == M_BF16DP) {
        score_ht_bf16<NG, N>(S, ss, qt, Hq, row, A.C + A.R, A.scale);
    } else {
        const int C = A.C, W = C + A.R, kc = ceil_div(C, 4);
        score_ht_q8<NG, N>(S, ss, qt, Hq, row, kc, C / 4, ceil_div(W, 4), qs, tok);
    }
}

template <int M, int NG>
void score_block_dp(const Args& A, float* S, int ss, const uint32_t* qt, int Hq, const char* const* row, int nb,
                    const float* qs, const float* tok) {
    int j = 0;
    for (; j + NT <= nb; j += NT) {
        score_tile_dp<M, NG, NT>(A, S + (size_t)j * ss, ss, qt, Hq, row + j, qs, tok + j);
    }
    float* s = S + (size_t)j * ss;
    switch (nb - j) {   // the last tile, fewer tokens (NT = 6)
        case 1: score_tile_dp<M, NG, 1>(A, s, ss, qt, Hq, row + j, qs, tok + j); break;
        case 2: score_tile_dp<M, NG, 2>(A, s, ss, qt, Hq, row + j, qs, tok + j); break;
        case 3: score_tile_dp<M, NG, 3>(A, s, ss, qt, Hq, row + j, qs, tok + j); break;
        case 4: score_tile_dp<M, NG, 4>(A, s, ss, qt, Hq, row + j, qs, tok + j); break;
        case 5: score_tile_dp<M, NG, 5>(A, s, ss, qt, Hq, row + j, qs, tok + j); break;
    }
}
static_assert(NT == 6, "score_block_dp's last tiles");

// bf16 rows with vdpbf16ps, int8 rows with vpdpbusd: per block (1) scores [token][head] in
// NT-token x 64-head tiles (heads in lanes), (2) online softmax on head vectors, P packed as
// the P·c tiles read it (dwords of 2 or 4 tokens of one head), (3) P·c per 64-column slice:
// the slice interleaved (8 or 16 KB, in L1), then 4-head x 64-column tiles of every head quad.
template <int M>
void run_item_dp(const Args& A, const Item& it) {
    const int C = A.C, W = C + A.R, Cp = ceil_div(C, 64) * 64, Hq = A.Hp;
    const int nh = it.h1 - it.h0, nhp = ceil_div(nh, HG) * HG, ngv = nhp / HG;
    const int nh4 = ceil_div(nh, HQ) * HQ;   // heads the P·c tiles run
    const int tg = M == M_BF16DP ? 2 : 4;    // tokens a dword of P and of X
    static thread_local Scratch sc;
    const size_t need = (size_t)nhp * (Cp + BS + BS / 2 + 4) + 4 * BS + 64;
    if (sc.f.size() < need) sc.f.resize(need);
    if (sc.rows.size() < 2 * BS) sc.rows.resize(2 * BS);
    float* acc = align64(sc.f.data());            // [nhp][Cp]
    float* S = acc + (size_t)nhp * Cp;            // [BS][nhp] scores (M_Q8: then P·s_c)
    uint32_t* P = (uint32_t*)(S + (size_t)nhp * BS);   // [BS / tg][nhp] P pairs / quads
    float* m = (float*)P + (size_t)nhp * BS / 2;
    float* l = m + nhp;
    float* corr = l + nhp;
    float* sb = corr + nhp;                       // M_Q8: P's scale per head (this block)
    float* tok = sb + nhp;                        // M_Q8: per token s_c, s_r, -128·Σc, -128·Σr [4][BS]
    const int nqt = qt_rows(M, C, A.R);
    const uint32_t* qt = (const uint32_t*)A.qprep + (size_t)it.b * nqt * Hq + it.h0;   // prep_query's
    const float* qs = A.qscale + (size_t)it.b * 2 * Hq + it.h0;   // M_Q8: s_q,c; s_q,r at + Hq
    item_start(acc, m, l, nhp, Cp);
    const char** cur = sc.rows.data();
    const char** nxt = cur + BS;
    int nb = it.t1 > it.t0 ? block_rows(cur, A, it, it.t0) : 0;
    const size_t nx = (size_t)(BS / tg) * 4;   // one interleaved 64-column slice
    if (sc.x.size() < 16 * nx + 16) sc.x.resize(16 * nx + 16);
    __m512i* X = (__m512i*)align64(sc.x.data());
    for (int t0 = it.t0; t0 < it.t1; t0 += BS) {
        const int nbn = t0 + BS < it.t1 ? block_rows(nxt, A, it, t0 + BS) : 0;
        if (M == M_Q8)
            for (int j = 0; j < nb; j++) {
                const char* meta = cur[j] + kv8_meta(W);
                float v[2];
                int32_t s[2];
                std::memcpy(v, meta, 8);
                std::memcpy(s, meta + 8, 8);
                const int32_t o[2] = {-128 * s[0], -128 * s[1]};   // the query codes' offset
                tok[j] = v[0];
                tok[BS + j] = v[1];
                std::memcpy(tok + 2 * BS + j, o, 4);
                std::memcpy(tok + 3 * BS + j, o + 1, 4);
            }
        for (int g0 = 0; g0 < ngv; g0 += 4) {   // head vectors, 4 at a time (all of K2's 64 heads)
            float* s = S + 16 * g0;
            const uint32_t* q = qt + 16 * g0;
            switch (std::min(4, ngv - g0)) {
                case 1: score_block_dp<M, 1>(A, s, nhp, q, Hq, cur, nb, qs + 16 * g0, tok); break;
                case 2: score_block_dp<M, 2>(A, s, nhp, q, Hq, cur, nb, qs + 16 * g0, tok); break;
                case 3: score_block_dp<M, 3>(A, s, nhp, q, Hq, cur, nb, qs + 16 * g0, tok); break;
                default: score_block_dp<M, 4>(A, s, nhp, q, Hq, cur, nb, qs + 16 * g0, tok); break;
            }
        }
        // online softmax, 16 heads a vector, tokens in order; P (zeros past nb) in token groups
        for (int g = 0; g < ngv; g++) {
            float* s = S + 16 * g;
            auto srow = [&](int j) { return s + (size_t)j * nhp; };
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < nb; j++) mx = _mm512_max_ps(mx, _mm512_load_ps(srow(j)));
            const __m512 mo = _mm512_load_ps(m + 16 * g), mn = _mm512_max_ps(mo, mx);
            const __m512 cr = exp512(_mm512_sub_ps(mo, mn));   // 0 on the first block (e^-104 is 0 in fp32)
            __m512 sum = _mm512_setzero_ps();
            uint32_t* pg = P + 16 * g;
            if (M == M_BF16DP) {   // P rounded to bf16 (vcvtneps2bf16: nearest even), token pairs
                for (int j = 0; j < nb; j += 2) {
                    const __m512 p0 = exp_p(_mm512_sub_ps(_mm512_load_ps(srow(j)), mn));
                    const __m512 p1 = j + 1 < nb ? exp_p(_mm512_sub_ps(_mm512_load_ps(srow(j + 1)), mn))
                                                 : _mm512_setzero_ps();
                    sum = _mm512_add_ps(_mm512_add_ps(sum, p0), p1);
                    const __m512i b0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p0));
                    const __m512i b1 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p1));
                    _mm512_store_si512(pg + (size_t)(j / 2) * nhp, _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16)));
                }
            } else {   // P·s_c (the rows' latent scales) as uint8 against its block max, token quads
                __m512 pm = _mm512_setzero_ps();
                for (int j = 0; j < nb; j++) {
                    const __m512 p = exp_p(_mm512_sub_ps(_mm512_load_ps(srow(j)), mn));
                    sum = _mm512_add_ps(sum, p);
                    const __m512 v = _mm512_mul_ps(p, _mm512_set1_ps(tok[j]));
                    _mm512_store_ps(srow(j), v);
                    pm = _mm512_max_ps(pm, v);
                }
                const __mmask16 pos = _mm512_cmp_ps_mask(pm, _mm512_setzero_ps(), _CMP_GT_OQ);
                const __m512 inv = _mm512_maskz_div_ps(pos, _mm512_set1_ps(255.f), pm);
                _mm512_store_ps(sb + 16 * g, _mm512_div_ps(pm, _mm512_set1_ps(255.f)));
                auto code = [&](int j) {
                    return j < nb ? _mm512_min_epu32(_mm512_cvtps_epu32(_mm512_mul_ps(_mm512_load_ps(srow(j)), inv)),
                                                     _mm512_set1_epi32(255))
                                  : _mm512_setzero_si512();
                };
                for (int j = 0; j < nb; j += 4) {
                    const __m512i d = _mm512_or_si512(_mm512_or_si512(code(j), _mm512_slli_epi32(code(j + 1), 8)),
                                                      _mm512_or_si512(_mm512_slli_epi32(code(j + 2), 16),
                                                                      _mm512_slli_epi32(code(j + 3), 24)));
                    _mm512_store_si512(pg + (size_t)(j / 4) * nhp, d);
                }
            }
            _mm512_store_ps(l + 16 * g, _mm512_fmadd_ps(_mm512_load_ps(l + 16 * g), cr, sum));
            _mm512_store_ps(m + 16 * g, mn);
            _mm512_store_ps(corr + 16 * g, cr);
        }
        const int ng = ceil_div(nb, tg);
        const int npv = ceil_div(C, 64) * (nh4 / HQ);
        int ti = 0;
        for (int c0 = 0; c0 < C; c0 += 64) {
            if (M == M_BF16DP) interleave_bf16(X, cur, nb, C, c0);
            else interleave_q8(X, cur, nb, C, c0);
            for (int i = 0; i < nh4; i += HQ, ti++) {
                prefetch_rows(nxt, (int)((int64_t)nbn * ti / npv), (int)((int64_t)nbn * (ti + 1) / npv), A.row_bytes);
                float* a = acc + (size_t)i * Cp;
                if (M == M_BF16DP) pv_tile_bf16(a, Cp, P + i, nhp, corr + i, X, ng, c0);
                else pv_tile_q8(a, Cp, P + i, nhp, corr + i, sb + i, X, ng, c0);
            }
        }
        std::swap(cur, nxt);
        nb = nbn;
    }
    item_finish(A, it, acc, Cp, m, l);
}
#endif

}  // namespace

static void mla_decode_portable(float* out, const float* q_latent, const float* q_pe, const char* pool, int kind,
                                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                                int page, int max_pages, float scale);

void mla_decode(float* out, const float* q_latent, const float* q_pe, const void* pool, int kind,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale) {
    if (B <= 0 || H <= 0 || C <= 0) return;
#ifndef K2_MLA_DP
    if (kind == KV_INT8)
        return mla_decode_portable(out, q_latent, q_pe, (const char*)pool, kind, page_table, lengths, B, H, C, R,
                                   page, max_pages, scale);
#endif
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    int mode = kind == KV_F32 ? M_F32 : M_BF16W;
#ifdef K2_MLA_DP
    if (kind == KV_INT8) mode = M_Q8;
    else if (kind == KV_BF16 && !g_exact) mode = M_BF16DP;
#endif
    const bool dp = mode == M_BF16DP || mode == M_Q8;
    const int hq = dp ? HG : HQ;   // heads a tile runs
    // Token ranges of KVC tokens at fixed positions; too few items for ~2 per thread: split the
    // heads too (chunks of a multiple of hq heads; no effect on any sum). One thread: never (each
    // chunk reads the rows again, and narrower score tiles load more per dot product).
    const int want = nt == 1 ? 1 : 2 * nt;
    std::vector<int> np(B), slot0(B);
    int nitems = 0, nslots = 0;
    for (int b = 0; b < B; b++) {
        np[b] = std::max(1, ceil_div(lengths[b], KVC));
        slot0[b] = nslots;
        if (np[b] > 1) nslots += np[b];
        nitems += np[b];
    }
    int hcs = H;
    if (nitems < want) {
        const int nhc = std::min(ceil_div(H, hq), ceil_div(want, nitems));
        hcs = ceil_div(ceil_div(H, nhc), hq) * hq;
    }
    std::vector<Item> items;
    for (int b = 0; b < B; b++)
        for (int k = 0; k < np[b]; k++)
            for (int h0 = 0; h0 < H; h0 += hcs)
                items.push_back({b, h0, std::min(H, h0 + hcs), k * KVC, std::min(lengths[b], (k + 1) * KVC),
                                 np[b] > 1 ? slot0[b] + k : -1, k, np[b]});
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) {
        return (int64_t)(x.t1 - x.t0) * (x.h1 - x.h0) > (int64_t)(y.t1 - y.t0) * (y.h1 - y.h0);
    });
    // Partials of split sequences: kept per calling thread up to 64 MB (fresh pages cost ~0.1 ms).
    static thread_local std::vector<float> kept;
    std::unique_ptr<float[]> big;
    float* part = align64(kept_scratch(kept, big, (size_t)nslots * H * (C + 2) + 16));
    const int W = C + R;
    const int row_bytes = kind == KV_F32 ? 4 * W : kind == KV_BF16 ? 2 * W : kv8_row_bytes(W);
    // the query in the dot products' form, once for all items: per sequence s_q,c [Hp], s_q,r [Hp]
    // (M_Q8), then the transposed query [qt_rows][Hp] (prep_query)
    const int Hp = ceil_div(H, HG) * HG;
    const size_t qrows = dp ? (size_t)qt_rows(mode, C, R) : 0;
    static thread_local std::vector<float> qkept;
    const size_t qn = dp ? (size_t)B * Hp * (2 + qrows) + 32 : 0;
    if (qkept.size() < qn) qkept.resize(qn);
    float* qscale = align64(qkept.data());
    uint32_t* qprep = (uint32_t*)qscale + 2 * (size_t)B * Hp;
    const Args A{out, q_latent, q_pe, (const char*)pool, page_table, H, C, R, page, max_pages, row_bytes, scale,
                 qprep, qscale, Hp, part, part + (size_t)nslots * H * C};
    std::vector<int> split;   // sequences with partials
    for (int b = 0; b < B; b++)
        if (np[b] > 1) split.push_back(b);
    const int nmerge = (int)split.size() * H;
    #pragma omp parallel
    {
#ifdef K2_MLA_DP
        if (mode == M_BF16DP || mode == M_Q8) {
            #pragma omp for schedule(static)
            for (int i = 0; i < B * Hp; i++) {
                const int b = i / Hp, h = i % Hp;
                float* qs = qscale + (size_t)b * 2 * Hp + h;
                uint32_t* qt = qprep + (size_t)b * qrows * Hp + h;
                if (mode == M_BF16DP) prep_query<M_BF16DP>(qt, qs, A, b, h);
                else prep_query<M_Q8>(qt, qs, A, b, h);
            }
        }
#endif
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < (int)items.size(); i++) {
            switch (mode) {
                case M_F32: run_item<M_F32>(A, items[i]); break;
                case M_BF16W: run_item<M_BF16W>(A, items[i]); break;
#ifdef K2_MLA_DP
                case M_BF16DP: run_item_dp<M_BF16DP>(A, items[i]); break;
                default: run_item_dp<M_Q8>(A, items[i]); break;
#endif
            }
        }
        #pragma omp for schedule(static)
        for (int i = 0; i < nmerge; i++) {   // out = Σ_k e^(m_k-M) acc_k / Σ_k e^(m_k-M) l_k, in range order
            const int b = split[i / H], h = i % H;
            const float* ml = A.part_ml + (size_t)slot0[b] * 2 * H;
            float M = -INFINITY;
            for (int k = 0; k < np[b]; k++) M = std::max(M, ml[(size_t)k * 2 * H + h]);
            float* o = out + ((size_t)b * H + h) * C;
            std::fill(o, o + C, 0.f);
            float lsum = 0.f;
            for (int k = 0; k < np[b]; k++) {
                const float w = std::exp(ml[(size_t)k * 2 * H + h] - M);
                lsum += w * ml[(size_t)k * 2 * H + H + h];
                const float* a = A.part_acc + ((size_t)slot0[b] * H + (size_t)h * np[b] + k) * C;
                #pragma omp simd
                for (int c = 0; c < C; c++) o[c] += w * a[c];
            }
            const float inv = 1.f / lsum;
            #pragma omp simd
            for (int c = 0; c < C; c++) o[c] *= inv;
        }
    }
}

#endif  // K2_AVX512

// The portable loops (AVX2 and scalar builds; int8 rows on AVX-512 builds without VNNI/BF16):
// work items (sequence, chunk of 8 heads); a block's bf16 or int8 rows are widened to float32
// once per item, then every head runs fp32 sums over them, as ref.
[[maybe_unused]] static void mla_decode_portable(float* out, const float* q_latent, const float* q_pe,
                                                 const char* pool, int kind, const int32_t* page_table,
                                                 const int32_t* lengths, int B, int H, int C, int R, int page,
                                                 int max_pages, float scale) {
    const int W = C + R;               // values per cached token
    const int HC = 8;                  // heads per work item
    const int BS = 64;                 // tokens per block
    const int nhc = ceil_div(H, HC);
    const size_t row_bytes = kind == KV_F32 ? 4 * (size_t)W : kind == KV_BF16 ? 2 * (size_t)W : kv8_row_bytes(W);
    #pragma omp parallel
    {
        std::vector<float> acc((size_t)HC * C), m(HC), l(HC), s(BS), wide(kind == KV_F32 ? 0 : (size_t)BS * W);
        std::vector<const float*> rows(BS);
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < B * nhc; it++) {
            const int b = it / nhc, h0 = (it % nhc) * HC, h1 = std::min(H, h0 + HC);
            const int n = lengths[b];
            std::fill(acc.begin(), acc.end(), 0.f);
            std::fill(m.begin(), m.end(), -INFINITY);
            std::fill(l.begin(), l.end(), 0.f);
            for (int t0 = 0; t0 < n; t0 += BS) {
                const int nb = std::min(BS, n - t0);
                for (int j = 0; j < nb; j++) {
                    const int t = t0 + j;
                    const char* r = pool + ((size_t)page_table[(size_t)b * max_pages + t / page] * page + t % page) * row_bytes;
                    float* w = wide.data() + (size_t)j * W;
                    if (kind == KV_F32) {
                        rows[j] = (const float*)r;
                        continue;
                    } else if (kind == KV_BF16) {
                        for (int c = 0; c < W; c++) w[c] = bf16_to_f32(((const uint16_t*)r)[c]);
                    } else {   // code · scale (ref.kv8_dequantize)
                        float sc[2];
                        std::memcpy(sc, r + kv8_meta(W), 8);
                        for (int c = 0; c < W; c++) w[c] = (float)((const int8_t*)r)[c] * sc[c >= C];
                    }
                    rows[j] = w;
                }
                for (int h = h0; h < h1; h++) {
                    const float* ql = q_latent + ((size_t)b * H + h) * C;
                    const float* qr = q_pe + ((size_t)b * H + h) * R;
                    float mb = -INFINITY;
                    for (int j = 0; j < nb; j++) {
                        const float* kv = rows[j];
                        float d1 = 0.f, d2 = 0.f;
                        #pragma omp simd reduction(+:d1)
                        for (int c = 0; c < C; c++) d1 += ql[c] * kv[c];
                        #pragma omp simd reduction(+:d2)
                        for (int r = 0; r < R; r++) d2 += qr[r] * kv[C + r];
                        s[j] = (d1 + d2) * scale;
                        mb = std::max(mb, s[j]);
                    }
                    const int hh = h - h0;
                    const float mn = std::max(m[hh], mb);
                    const float corr = std::exp(m[hh] - mn);     // 0 on the first block
                    float* a = &acc[(size_t)hh * C];
                    float lsum = l[hh] * corr;
                    #pragma omp simd
                    for (int c = 0; c < C; c++) a[c] *= corr;
                    for (int j = 0; j < nb; j++) {
                        const float p = std::exp(s[j] - mn);
                        lsum += p;
                        const float* kv = rows[j];
                        #pragma omp simd
                        for (int c = 0; c < C; c++) a[c] += p * kv[c];
                    }
                    m[hh] = mn;
                    l[hh] = lsum;
                }
            }
            for (int h = h0; h < h1; h++) {
                const int hh = h - h0;
                const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;   // length 0 -> zeros
                float* o = out + ((size_t)b * H + h) * C;
                for (int c = 0; c < C; c++) o[c] = acc[(size_t)hh * C + c] * inv;
            }
        }
    }
}

#ifndef K2_AVX512
void mla_decode(float* out, const float* q_latent, const float* q_pe, const void* pool, int kind,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale) {
    mla_decode_portable(out, q_latent, q_pe, (const char*)pool, kind, page_table, lengths, B, H, C, R, page,
                        max_pages, scale);
}
#endif

// The two absorbed projections around mla_decode, straight from kv_b_proj's bf16 rows
// ([H*(N+V), C]: per head N rows of W_UK, then V rows of W_UV), no float32 copy of it:
//   q_latent[b,h,:] = Σ_n q_nope[b,h,n] · W_UK[h,n,:]      (rows scaled and summed)
//   o[b,h,v]        = u[b,h,:] · W_UV[h,v,:]                (a GEMV per head)
// Work items are heads; each head's rows stream from memory once for all B sequences.
void mla_absorb_q(float* out, const float* q_nope, const uint16_t* kv_b, int B, int H, int N, int V, int C) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int h = 0; h < H; h++) {
        const uint16_t* w = kv_b + (size_t)h * (N + V) * C;
        for (int b = 0; b < B; b++) {
            float* o = out + ((size_t)b * H + h) * C;
            for (int c = 0; c < C; c++) o[c] = 0.f;
        }
        for (int n = 0; n < N; n++) {
            const uint16_t* wr = w + (size_t)n * C;
            for (int b = 0; b < B; b++) {
                const float qv = q_nope[((size_t)b * H + h) * N + n];
                float* o = out + ((size_t)b * H + h) * C;
                #pragma omp simd
                for (int c = 0; c < C; c++) o[c] += qv * bf16_to_f32(wr[c]);
            }
        }
    }
}

void mla_absorb_o(float* out, const float* u, const uint16_t* kv_b, int B, int H, int N, int V, int C) {
    #pragma omp parallel
    {
        std::vector<float> uh((size_t)B * C);
        #pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < H; h++) {
            for (int b = 0; b < B; b++) bf16_prep_x(&uh[(size_t)b * C], u + ((size_t)b * H + h) * C, 1, C);
            bf16_rows(out + (size_t)h * V, H * V, uh.data(), B, C, kv_b + ((size_t)h * (N + V) + N) * C, 0, V);
        }
    }
}
