// Causal prefill attention, expanded form: q[T,H,Dk], k[S,H,Dk], v[S,H,Dv] -> out[T,H,Dv].
// Query t sits at position q_offset + t and sees keys 0..min(S-1, q_offset+t). fp32 softmax.
//
// Written as two small GEMMs per (head, block of QB queries), so no dot product needs a
// horizontal sum: the keys are transposed once per call into blocks of 32 keys,
// kt[h][s/32][i][s%32] (zero-padded to Sp keys, each block's Dk rows contiguous), and a score
// row is built by broadcast-FMAs over consecutive keys (sc[j][s] += q[j][i] * kt[..][i][s]); the output rows then accumulate p[j][s] * v[s]. On AVX-512 both products keep
// 16 accumulators in registers; elsewhere the same loop order as plain `omp simd` loops.
#include "common.h"
#include <vector>
#include <algorithm>

static const int QB = 8;   // queries sharing each key / value load

#ifdef K2_AVX512
// sc[j][s] for j < QB, s < ceil(nmax/32)*32 <= Sp; qb[j][Dk] holds the scaled queries.
static void scores_block(float* sc, int Sp, const float* qb, const float* kh, int Dk, int nmax) {
    for (int s0 = 0; s0 < nmax; s0 += 32) {
        __m512 acc[QB][2];
        for (int j = 0; j < QB; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
        for (int i = 0; i < Dk; i++) {
            const __m512 k0 = _mm512_load_ps(kh + (size_t)s0 * Dk + 32 * i);
            const __m512 k1 = _mm512_load_ps(kh + (size_t)s0 * Dk + 32 * i + 16);
            for (int j = 0; j < QB; j++) {
                const __m512 qv = _mm512_set1_ps(qb[j * Dk + i]);
                acc[j][0] = _mm512_fmadd_ps(qv, k0, acc[j][0]);
                acc[j][1] = _mm512_fmadd_ps(qv, k1, acc[j][1]);
            }
        }
        for (int j = 0; j < QB; j++) {
            _mm512_storeu_ps(sc + (size_t)j * Sp + s0, acc[j][0]);
            _mm512_storeu_ps(sc + (size_t)j * Sp + s0 + 16, acc[j][1]);
        }
    }
}

// o[j] (row stride ldo) = Σ_s p[j][s] v[s] for j < nq; p rows are zero past each query's keys.
static void pv_block(float* o, size_t ldo, int nq, const float* p, int Sp, const float* vh, size_t ldv,
                     int Dv, int nmax) {
    for (int j0 = 0; j0 < nq; j0 += 4) {
        for (int c0 = 0; c0 < Dv; c0 += 64) {
            __mmask16 m[4];
            for (int c = 0; c < 4; c++) {
                const int left = Dv - c0 - 16 * c;
                m[c] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            }
            __m512 acc[4][4];
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
            for (int s = 0; s < nmax; s++) {
                const float* vs = vh + (size_t)s * ldv + c0;
                __m512 vv[4];
                for (int c = 0; c < 4; c++) vv[c] = _mm512_maskz_loadu_ps(m[c], vs + 16 * c);
                for (int j = 0; j < 4; j++) {
                    const __m512 pj = _mm512_set1_ps(p[(size_t)(j0 + j) * Sp + s]);
                    for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(pj, vv[c], acc[j][c]);
                }
            }
            for (int j = 0; j < 4 && j0 + j < nq; j++)
                for (int c = 0; c < 4; c++)
                    _mm512_mask_storeu_ps(o + (j0 + j) * ldo + c0 + 16 * c, m[c], acc[j][c]);
        }
    }
}
#else
static void scores_block(float* sc, int Sp, const float* qb, const float* kh, int Dk, int nmax) {
    for (int j = 0; j < QB; j++)
        for (int s = 0; s < nmax; s++) sc[(size_t)j * Sp + s] = 0.f;
    for (int s0 = 0; s0 < nmax; s0 += 32)
        for (int i = 0; i < Dk; i++) {
            const float* kr = kh + (size_t)s0 * Dk + 32 * i;
            for (int j = 0; j < QB; j++) {
                const float qv = qb[j * Dk + i];
                float* sj = sc + (size_t)j * Sp + s0;
                #pragma omp simd
                for (int s = 0; s < 32; s++) sj[s] += qv * kr[s];
            }
        }
}

static void pv_block(float* o, size_t ldo, int nq, const float* p, int Sp, const float* vh, size_t ldv,
                     int Dv, int nmax) {
    for (int j = 0; j < nq; j++) {
        float* oj = o + j * ldo;
        for (int i = 0; i < Dv; i++) oj[i] = 0.f;
        for (int s = 0; s < nmax; s++) {
            const float pj = p[(size_t)j * Sp + s];
            const float* vs = vh + (size_t)s * ldv;
            #pragma omp simd
            for (int i = 0; i < Dv; i++) oj[i] += pj * vs[i];
        }
    }
}
#endif

void attention(float* out, const float* q, const float* k, const float* v, int T, int S, int H,
               int Dk, int Dv, float scale, int q_offset) {
    if (T <= 0 || H <= 0) return;
    const int Sp = ceil_div(S > 0 ? S : 1, 32) * 32;    // key rows padded (zeros) to 32
    const int nqb = ceil_div(T, QB);
    // Transposed keys: kept per thread up to 64 MB (a fresh buffer's page faults cost ~40% of a
    // 512-token call); beyond, where it grows like k itself, freed on return. Uninitialised:
    // the transpose writes every element, padding included.
    static thread_local std::vector<float> kept;
    std::unique_ptr<float[]> big;
    float* ktp = align64(kept_scratch(kept, big, (size_t)H * Dk * Sp + 16));
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int h = 0; h < H; h++)
            for (int s = 0; s < Sp; s++) {
                float* dst = ktp + (size_t)h * Dk * Sp + (size_t)(s / 32) * 32 * Dk + s % 32;
                const float* ks = k + ((size_t)s * H + h) * Dk;
                for (int i = 0; i < Dk; i++) dst[32 * i] = s < S ? ks[i] : 0.f;
            }
        std::vector<float> sc((size_t)QB * Sp), qb((size_t)QB * Dk);
        // later query blocks see more keys: hand them out first
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < nqb * H; it++) {
            const int tb = nqb - 1 - it / H, h = it % H;
            const int t0 = tb * QB, nq = std::min(QB, T - t0);
            const int nmax = std::max(0, std::min(S, q_offset + t0 + nq));   // keys the last query sees
            for (int j = 0; j < QB; j++)
                for (int i = 0; i < Dk; i++)
                    qb[(size_t)j * Dk + i] = j < nq ? q[((size_t)(t0 + j) * H + h) * Dk + i] * scale : 0.f;
            scores_block(sc.data(), Sp, qb.data(), ktp + (size_t)h * Dk * Sp, Dk, nmax);
            for (int j = 0; j < QB; j++) {                 // softmax; zero past each query's keys
                const int n = j < nq ? std::max(0, std::min(S, q_offset + t0 + j + 1)) : 0;
                float* sj = sc.data() + (size_t)j * Sp;
                float mx = -INFINITY, sum = 0.f;
                for (int s = 0; s < n; s++) mx = std::max(mx, sj[s]);
                for (int s = 0; s < n; s++) { sj[s] = std::exp(sj[s] - mx); sum += sj[s]; }
                const float inv = sum > 0.f ? 1.f / sum : 0.f;
                for (int s = 0; s < n; s++) sj[s] *= inv;
                for (int s = n; s < nmax; s++) sj[s] = 0.f;
            }
            pv_block(out + ((size_t)t0 * H + h) * Dv, (size_t)H * Dv, nq, sc.data(), Sp,
                     v + (size_t)h * Dv, (size_t)H * Dv, Dv, nmax);
        }
    }
}
