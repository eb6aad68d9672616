// Absorbed MLA decode over the paged latent cache (K2_SPEC §3.4): per sequence b and head h,
// u[b,h] = Σ_t softmax_t(scale·(q_latent·c_t + q_pe·k_pe_t)) · c_t, t < lengths[b].
// Softmax is fp32 and streaming (running max m, running sum l, rescaled accumulator).
//
// AVX-512: work items are (sequence, token range, head chunk). Long sequences are split into
// token ranges (split-KV, ~4 items per thread, the (m, l, acc) partials merged at the end), so
// a single sequence keeps every thread busy and its rows leave memory once; short contexts
// split the heads instead. An item walks its range in blocks of BS tokens (~147 KB at K2
// shapes: L2, the next block prefetched) and all heads of the item visit each block:
// (1) scores in 4-head x 4-token register tiles (16 independent FMA chains, one
// horizontal-sum tree per tile), (2) online softmax with a vector exp, (3) P·c in 4-head x
// 64-column register tiles, each row slice loaded once per 4 heads.
// Elsewhere: the portable loops, work items (sequence, chunk of 8 heads).
#include "common.h"
#include <type_traits>
#include <vector>
#include <algorithm>

#ifdef K2_AVX512
namespace {

const int BS = 64;   // tokens per block
const int HQ = 4;    // heads per register tile
const int MINP = 256;   // fewest tokens per range; below, heads split instead (no merge: ~15% at 260)

// exp(x) for x <= 0 (Cephes expf: 2^n · poly(r), |r| <= ln2/2, ~1 ulp); scalef underflows to
// 0 cleanly, the clamp maps -inf; NaN passes through.
inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

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

// 16 cache elements from p as fp32 (m: which; the rest zero): float32 rows, or bf16 bits
// (a bf16 block is widened once into scratch rows, not in the tiles, which every head quad
// runs over each row again).
inline __m512 load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(__mmask16 m, const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Row i of a 4x4 register tile (named accumulators aij, see below): aij += v · xj, j < 4.
#define K2_FMA4(i, v)                                                                              \
    {                                                                                              \
        const __m512 v_ = (v);                                                                     \
        a##i##0 = _mm512_fmadd_ps(v_, x0, a##i##0);                                                \
        a##i##1 = _mm512_fmadd_ps(v_, x1, a##i##1);                                                \
        a##i##2 = _mm512_fmadd_ps(v_, x2, a##i##2);                                                \
        a##i##3 = _mm512_fmadd_ps(v_, x3, a##i##3);                                                \
    }

// s[i*BS + j] = scale · q_i·row_j for 4 heads (q rows Wp apart, zero past W) x 4 rows of W
// elements; the rows are not padded: the last step's masked loads stay inside them.
inline void score_tile(float* s, const float* q, int Wp, const float* const* row, int W, float scale) {
    const float *r0 = row[0], *r1 = row[1], *r2 = row[2], *r3 = row[3];
    // named accumulators (head i, token j: aij), as in pv_tile
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m512 a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int c = 0; c < W; c += 16) {
        const __mmask16 m = W - c >= 16 ? 0xFFFF : (__mmask16)((1u << (W - c)) - 1);
        const __m512 x0 = load16(m, r0 + c), x1 = load16(m, r1 + c);
        const __m512 x2 = load16(m, r2 + c), x3 = load16(m, r3 + c);
#define K2_QK_HEAD(i) K2_FMA4(i, _mm512_load_ps(q + (size_t)i * Wp + c))
        K2_QK_HEAD(0) K2_QK_HEAD(1) K2_QK_HEAD(2) K2_QK_HEAD(3)
#undef K2_QK_HEAD
    }
    const __m512 a[16] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33};
    const __m512 r = _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale));   // lane 4i+j: head i, token j
    _mm_storeu_ps(s, _mm512_extractf32x4_ps(r, 0));
    _mm_storeu_ps(s + BS, _mm512_extractf32x4_ps(r, 1));
    _mm_storeu_ps(s + 2 * BS, _mm512_extractf32x4_ps(r, 2));
    _mm_storeu_ps(s + 3 * BS, _mm512_extractf32x4_ps(r, 3));
}

// acc[i][c0..c0+64) = acc·corr[i] + Σ_{j<nb} p[i*BS + j] · row_j[c0..c0+64) for 4 heads
// (acc rows Cp apart); m masks the columns past C (loaded as zeros).
inline void pv_tile(float* acc, int Cp, const float* p, const float* corr, const float* const* row, int nb,
                    int c0, const __mmask16* m) {
    // named accumulators (head i, columns 16k: aik): gcc 12 stores an array of them to the
    // stack on every token here (1.6x slower)
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m512 a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int j = 0; j < nb; j++) {
        const float* r = row[j] + c0;
        const __m512 x0 = load16(m[0], r), x1 = load16(m[1], r + 16);
        const __m512 x2 = load16(m[2], r + 32), x3 = load16(m[3], r + 48);
#define K2_PV_HEAD(i) K2_FMA4(i, _mm512_set1_ps(p[i * BS + j]))
        K2_PV_HEAD(0) K2_PV_HEAD(1) K2_PV_HEAD(2) K2_PV_HEAD(3)
#undef K2_PV_HEAD
    }
    const __m512 a[16] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33};
    for (int k = 0; k < 16; k++) {
        float* ak = acc + (size_t)(k / 4) * Cp + c0 + 16 * (k % 4);
        _mm512_store_ps(ak, _mm512_fmadd_ps(_mm512_load_ps(ak), _mm512_set1_ps(corr[k / 4]), a[k]));
    }
}

struct Item { int b, h0, h1, t0, t1, slot; };   // slot < 0: whole sequence, written to out

struct Args {
    float* out; const float* q_latent; const float* q_pe; const void* pool; const int32_t* page_table;
    int H, C, R, page, max_pages; float scale;
    float* part_acc; float* part_ml;   // per slot: acc [H][C]; m [H] then l [H]
};

template <class E>
void run_item(const Args& A, const Item& it) {
    const int C = A.C, R = A.R, W = C + R, H = A.H;
    const int Wp = ceil_div(W, 16) * 16, Cp = ceil_div(C, 64) * 64;
    const int nh = it.h1 - it.h0, nhp = ceil_div(nh, HQ) * HQ;
    // per thread, kept between calls: O(H·(C+R)), independent of the context length
    static thread_local std::vector<float> buf;
    static thread_local std::vector<const E*> rows(2 * BS);   // this block's, the next's
    static thread_local std::vector<const float*> frows(BS);  // this block's as float32 rows
    static thread_local std::vector<float> wide;              // bf16 pools: [BS][Wp] widened
    const size_t need = (size_t)nhp * (Wp + Cp + BS + 3) + 16;
    if (buf.size() < need) buf.resize(need);
    float* qc = align64(buf.data());              // [nhp][Wp]: q_latent | q_pe | zeros
    float* acc = qc + (size_t)nhp * Wp;           // [nhp][Cp]
    float* S = acc + (size_t)nhp * Cp;            // [nhp][BS] scores, then P
    float* m = S + (size_t)nhp * BS;
    float* l = m + nhp;
    float* corr = l + nhp;
    for (int i = 0; i < nhp; i++) {
        float* qi = qc + (size_t)i * Wp;
        const int h = it.h0 + i;
        if (i < nh) {
            std::memcpy(qi, A.q_latent + ((size_t)it.b * H + h) * C, sizeof(float) * C);
            std::memcpy(qi + C, A.q_pe + ((size_t)it.b * H + h) * R, sizeof(float) * R);
            std::fill(qi + W, qi + Wp, 0.f);
        } else {
            std::fill(qi, qi + Wp, 0.f);
        }
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
    std::fill(acc, acc + (size_t)nhp * Cp, 0.f);
    const int32_t* pt = A.page_table + (size_t)it.b * A.max_pages;
    const E** cur = rows.data();
    const E** nxt = cur + BS;
    const E* pool = (const E*)A.pool;
    auto block_rows = [&](const E** r, int t0) {
        const int nb = std::min(BS, it.t1 - t0);
        for (int j = 0; j < nb; j++) {
            const int t = t0 + j;
            r[j] = pool + ((size_t)pt[t / A.page] * A.page + t % A.page) * W;
        }
        return nb;
    };
    const int nq = nhp / HQ;
    int nb = it.t1 > it.t0 ? block_rows(cur, it.t0) : 0;
    for (int t0 = it.t0; t0 < it.t1; t0 += BS) {
        const int nb4 = ceil_div(nb, 4) * 4;
        for (int j = 0; j < nb; j++) {
            if constexpr (std::is_same<E, float>::value) {
                frows[j] = cur[j];
            } else {
                if (wide.size() < (size_t)BS * Wp) wide.resize((size_t)BS * Wp);
                float* w = wide.data() + (size_t)j * Wp;
                for (int c = 0; c < W; c += 16) {
                    const __mmask16 k = W - c >= 16 ? 0xFFFF : (__mmask16)((1u << (W - c)) - 1);
                    _mm512_mask_storeu_ps(w + c, k, load16(k, cur[j] + c));
                }
                frows[j] = w;
            }
        }
        for (int j = nb; j < nb4; j++) frows[j] = frows[nb - 1];   // score padding, unused
        // the next block's rows (scattered pages) are prefetched into L2 a slice per head quad
        const int nbn = t0 + BS < it.t1 ? block_rows(nxt, t0 + BS) : 0;
        for (int i = 0; i < nhp; i += HQ) {
            for (int j = 0; j < nb4; j += 4)
                score_tile(S + (size_t)i * BS + j, qc + (size_t)i * Wp, Wp, frows.data() + j, W, A.scale);
            for (int j = nbn * (i / HQ) / nq; j < nbn * (i / HQ + 1) / nq; j++) {
                const char* r = (const char*)nxt[j];
                const int bytes = W * (int)sizeof(E);
                for (int o = 0; o < bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
                _mm_prefetch(r + bytes - 1, _MM_HINT_T1);
            }
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
            for (int j = 0; j < nb; j += 16) {
                const __mmask16 k = nb - j >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - j)) - 1);
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
                pv_tile(acc + (size_t)i * Cp, Cp, S + (size_t)i * BS, corr + i, frows.data(), nb, c0, cm);
            }
        std::swap(cur, nxt);
        nb = nbn;
    }
    for (int i = 0; i < nh; i++) {
        const int h = it.h0 + i;
        const float* ai = acc + (size_t)i * Cp;
        if (it.slot < 0) {
            const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;   // length 0 -> zeros
            float* o = A.out + ((size_t)it.b * H + h) * C;
            for (int c = 0; c < C; c++) o[c] = ai[c] * inv;
        } else {
            std::memcpy(A.part_acc + ((size_t)it.slot * H + h) * C, ai, sizeof(float) * C);
            A.part_ml[(size_t)it.slot * 2 * H + h] = m[i];
            A.part_ml[(size_t)it.slot * 2 * H + H + h] = l[i];
        }
    }
}

}  // namespace

void mla_decode(float* out, const float* q_latent, const float* q_pe, const void* pool, bool bf16,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale) {
    if (B <= 0 || H <= 0 || C <= 0) return;
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    // Token ranges: ~4 items per thread over all sequences, at least MINP tokens each.
    const int want = 4 * nt;
    int64_t total = 0;
    for (int b = 0; b < B; b++) total += lengths[b];
    std::vector<int> np(B), slot0(B);
    int nitems = 0, nslots = 0;
    for (int b = 0; b < B; b++) {
        const int n = lengths[b];
        const int64_t byshare = total > 0 ? ((int64_t)n * want + total - 1) / total : 1;
        np[b] = (int)std::max<int64_t>(1, std::min<int64_t>(byshare, n / MINP));
        slot0[b] = nslots;
        if (np[b] > 1) nslots += np[b];
        nitems += np[b];
    }
    // Too few tokens for that: split the heads too (chunks of a multiple of HQ heads).
    int hcs = H;
    if (nitems < want) {
        const int nhc = std::min(ceil_div(H, HQ), ceil_div(want, nitems));
        hcs = ceil_div(ceil_div(H, nhc), HQ) * HQ;
    }
    std::vector<Item> items;
    for (int b = 0; b < B; b++)
        for (int k = 0; k < np[b]; k++)
            for (int h0 = 0; h0 < H; h0 += hcs) {
                const int64_t n = lengths[b];
                items.push_back({b, h0, std::min(H, h0 + hcs), (int)(n * k / np[b]), (int)(n * (k + 1) / np[b]),
                                 np[b] > 1 ? slot0[b] + k : -1});
            }
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) {
        return (int64_t)(x.t1 - x.t0) * (x.h1 - x.h0) > (int64_t)(y.t1 - y.t0) * (y.h1 - y.h0);
    });
    // Partials of split sequences: kept per calling thread up to 64 MB (fresh pages cost ~0.1 ms).
    static thread_local std::vector<float> kept;
    std::unique_ptr<float[]> big;
    float* part = kept_scratch(kept, big, (size_t)nslots * H * (C + 2));
    const Args A{out, q_latent, q_pe, pool, page_table, H, C, R, page, max_pages, scale,
                 part, part + (size_t)nslots * H * C};
    std::vector<int> split;   // sequences with partials
    for (int b = 0; b < B; b++)
        if (np[b] > 1) split.push_back(b);
    const int nmerge = (int)split.size() * H;
    #pragma omp parallel
    {
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < (int)items.size(); i++) {
            if (bf16) run_item<uint16_t>(A, items[i]);
            else run_item<float>(A, items[i]);
        }
        #pragma omp for schedule(static)
        for (int i = 0; i < nmerge; i++) {   // out = Σ_k e^(m_k-M) acc_k / Σ_k e^(m_k-M) l_k
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
                const float* a = A.part_acc + ((size_t)(slot0[b] + k) * H + h) * C;
                #pragma omp simd
                for (int c = 0; c < C; c++) o[c] += w * a[c];
            }
            const float inv = 1.f / lsum;
            #pragma omp simd
            for (int c = 0; c < C; c++) o[c] *= inv;
        }
    }
}

#else
static inline float elem(const float* p, int i) { return p[i]; }
static inline float elem(const uint16_t* p, int i) { return bf16_to_f32(p[i]); }

template <class E>
static void mla_decode_portable(float* out, const float* q_latent, const float* q_pe, const E* pool,
                                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                                int page, int max_pages, float scale) {
    const int W = C + R;               // floats per cached token
    const int HC = 8;                  // heads per work item
    const int BS = 64;                 // tokens per block
    const int nhc = ceil_div(H, HC);
    #pragma omp parallel
    {
        std::vector<float> acc((size_t)HC * C), m(HC), l(HC), s(BS);
        std::vector<const E*> rows(BS);
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
                    int t = t0 + j;
                    rows[j] = pool + ((size_t)page_table[(size_t)b * max_pages + t / page] * page + t % page) * W;
                }
                for (int h = h0; h < h1; h++) {
                    const float* ql = q_latent + ((size_t)b * H + h) * C;
                    const float* qr = q_pe + ((size_t)b * H + h) * R;
                    float mb = -INFINITY;
                    for (int j = 0; j < nb; j++) {
                        const E* kv = rows[j];
                        float d1 = 0.f, d2 = 0.f;
                        #pragma omp simd reduction(+:d1)
                        for (int c = 0; c < C; c++) d1 += ql[c] * elem(kv, c);
                        #pragma omp simd reduction(+:d2)
                        for (int r = 0; r < R; r++) d2 += qr[r] * elem(kv, C + r);
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
                        const E* kv = rows[j];
                        #pragma omp simd
                        for (int c = 0; c < C; c++) a[c] += p * elem(kv, c);
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

void mla_decode(float* out, const float* q_latent, const float* q_pe, const void* pool, bool bf16,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale) {
    if (bf16)
        mla_decode_portable(out, q_latent, q_pe, (const uint16_t*)pool, page_table, lengths, B, H, C, R, page,
                            max_pages, scale);
    else
        mla_decode_portable(out, q_latent, q_pe, (const float*)pool, page_table, lengths, B, H, C, R, page,
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
