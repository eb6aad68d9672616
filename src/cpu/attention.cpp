// Causal prefill attention, expanded form: q[T,H,Dk], k[S,H,Dk], v[S,H,Dv] -> out[T,H,Dv].
// Query t sits at position q_offset + t and sees keys 0..min(S-1, q_offset+t). fp32 softmax.
// Keys and values are read in place through strides (AttnKV, common.h): for MLA, k = kv_b's
// per-head nope part next to the rope key shared by all heads, v = kv_b's other part, so the
// per-head keys and values are never copied out (the transposes below read them once).
// With lse (not null) it also gives each (t, h)'s log-sum-exp of the scaled scores (-inf when
// it sees no key); with merge, out and lse already hold the result over other keys (an earlier
// block of the history) and the two are combined: the caller walks a long history in blocks.
//
// Written as two small GEMMs per (head, block of QB queries), so no dot product needs a
// horizontal sum: the keys are transposed once per call into blocks of 32 keys (zero-padded to
// Sp keys, each block's rows contiguous), and a score row is built by broadcast-multiplies over
// consecutive keys; the output rows then accumulate p[j][s] * v[s]. On AVX-512 both products
// keep 16 accumulators in registers; elsewhere the same loop order as plain `omp simd` loops.
// With AVX512-BF16 (not in exact mode) P·v runs on vdpbf16ps: v and the probabilities rounded
// to bf16, pairs of adjacent keys summed per instruction in a fixed order. The scores stay fp32:
// here both q and k would be rounded (k = kv_b's output; mla_decode's latent is bf16 already),
// and score errors go into the exponent: greedy tokens of a peaked random model moved.
#include "common.h"
#include <vector>
#include <algorithm>

static const int QB = 8;      // queries sharing each key / value load
static const int QS = 64;     // queries of a work item (a multiple of QB)
static const int KBLK = 512;  // keys per block of a work item (a multiple of 32): K2's keys and values
                              // of a head, 196 + 128 KB as bf16, stay in L2

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

#ifdef K2_BF16DP
static inline uint16_t bf16_bits(float f) {
    f = round_bf16(f);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

// o[j] = Σ_s p[j][s] v[s]: pb[j][Sp/2] dwords (probabilities of keys 2s, 2s+1), values vb: per
// key pair a row of Dvp dwords (column c: keys 2s, 2s+1).
static void pv_block_dp(float* o, size_t ldo, int nq, const uint32_t* pb, int Sp, const uint16_t* vb, int Dvp,
                        int Dv, int nmax) {
    const int np2 = (nmax + 1) / 2;
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
            for (int s = 0; s < np2; s++) {
                const uint16_t* vs = vb + ((size_t)s * Dvp + c0) * 2;
                __m512bh vv[4];
                for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_maskz_loadu_epi32(m[c], vs + 32 * c);
                for (int j = 0; j < 4; j++) {
                    const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pb[(size_t)(j0 + j) * (Sp / 2) + s]);
                    for (int c = 0; c < 4; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], pj, vv[c]);
                }
            }
            for (int j = 0; j < 4 && j0 + j < nq; j++)
                for (int c = 0; c < 4; c++)
                    _mm512_mask_storeu_ps(o + (j0 + j) * ldo + c0 + 16 * c, m[c], acc[j][c]);
        }
    }
}
#endif
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

void attention(float* out, float* lse, bool merge, const float* q, const AttnKV& kv, int T, int S, int H, int Dv,
               float scale, int q_offset) {
    const int Dk = kv.N + kv.R;
    // key element i of token s, head h: the per-head part, then the part shared by all heads
    auto kval = [&](int s, int h, int i) {
        return i < kv.N ? kv.kn[(size_t)s * kv.kn_tok + (size_t)h * kv.kn_head + i] : kv.kr[(size_t)s * kv.kr_tok + i - kv.N];
    };
    auto vrow = [&](int s, int h) { return kv.v + (size_t)s * kv.v_tok + (size_t)h * kv.v_head; };
    if (T <= 0 || H <= 0) return;
    const int Sp = ceil_div(S > 0 ? S : 1, 32) * 32;    // key rows padded (zeros) to 32
    bool dp = false;
#ifdef K2_BF16DP
    dp = !g_exact;
#endif
    const int Dvp = ceil_div(Dv > 0 ? Dv : 1, 16) * 16;
    // Transposed keys (and, dp, paired values): kept per thread up to 64 MB (a fresh buffer's page
    // faults cost ~40% of a 512-token call); beyond, where it grows like k itself, freed on
    // return. Uninitialised: the transposes write every element, padding included.
    static thread_local std::vector<float> kept;
    std::unique_ptr<float[]> big;
    const size_t kfloats = (size_t)H * Dk * Sp + (dp ? (size_t)H * (Sp / 2) * Dvp : 0);
    float* ktp = align64(kept_scratch(kept, big, kfloats + 32));
    [[maybe_unused]] uint16_t* vb = (uint16_t*)(ktp + (size_t)H * Dk * Sp);   // [H][Sp/2][Dvp][2]
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int h = 0; h < H; h++)
            for (int s = 0; s < Sp; s++) {
                float* dst = ktp + (size_t)h * Dk * Sp + (size_t)(s / 32) * 32 * Dk + s % 32;
                for (int i = 0; i < Dk; i++) dst[32 * i] = s < S ? kval(s, h, i) : 0.f;
            }
#ifdef K2_BF16DP
        if (dp) {
            #pragma omp for schedule(static)
            for (int h = 0; h < H; h++)
                for (int s = 0; s < Sp; s++) {
                    uint16_t* vd = vb + ((size_t)h * (Sp / 2) + s / 2) * Dvp * 2 + s % 2;
                    const float* vs = s < S ? vrow(s, h) : nullptr;
                    for (int c = 0; c < Dvp; c++) vd[2 * c] = vs && c < Dv ? bf16_bits(vs[c]) : 0;
                }
        }
#endif
        // Work items: (head, super-block of QS queries); an item walks the keys in blocks of KBLK
        // (their keys and values stay in L2 while its QS/QB query blocks pass over them) with an
        // online softmax per query (running max m, sum l, rescaled accumulator acc).
        std::vector<float> sc((size_t)QB * KBLK + 32), qb((size_t)QS * Dk), ob((size_t)QB * Dv);
        std::vector<float> acc((size_t)QS * Dv), m(QS), l(QS), corr(QB);
        std::vector<uint32_t> pb(dp ? (size_t)QB * KBLK / 2 : 0);
        const int nsb = ceil_div(T, QS);
        // later query blocks see more keys: hand them out first
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < nsb * H; it++) {
            const int sb = nsb - 1 - it / H, h = it % H;
            const int ts = sb * QS, nqs = std::min(QS, T - ts);
            const int smax = std::max(0, std::min(S, q_offset + ts + nqs));   // keys the last query sees
            for (int j = 0; j < QS; j++) {
                for (int i = 0; i < Dk; i++)
                    qb[(size_t)j * Dk + i] = j < nqs ? q[((size_t)(ts + j) * H + h) * Dk + i] * scale : 0.f;
                m[j] = -INFINITY;
                l[j] = 0.f;
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int k0 = 0; k0 < smax; k0 += KBLK) {
                for (int t0 = ts; t0 < ts + nqs; t0 += QB) {
                    const int nq = std::min(QB, ts + nqs - t0), jb = t0 - ts;
                    // keys of this block the block's last query sees
                    const int nmax = std::min(KBLK, std::max(0, std::min(S, q_offset + t0 + nq) - k0));
                    if (nmax == 0) continue;
                    scores_block(sc.data(), KBLK, qb.data() + (size_t)jb * Dk, ktp + (size_t)h * Dk * Sp + (size_t)k0 * Dk,
                                 Dk, nmax);
                    for (int j = 0; j < QB; j++) {   // online softmax; P zero past each query's keys
                        const int n = j < nq ? std::min(nmax, std::max(0, std::min(S, q_offset + t0 + j + 1) - k0)) : 0;
                        float* sj = sc.data() + (size_t)j * KBLK;
                        float mx = -INFINITY, sum = 0.f;
                        for (int s = 0; s < n; s++) mx = std::max(mx, sj[s]);
                        const float mo = j < nq ? m[jb + j] : -INFINITY, mn = std::max(mo, mx);
                        int s0 = 0;
#ifdef K2_AVX512
                        if (n > 0) {   // a vector exp: one std::exp per score was most of a long chunk's time
                            __m512 va = _mm512_setzero_ps();
                            const __m512 mv = _mm512_set1_ps(mn);
                            for (; s0 + 16 <= n; s0 += 16) {
                                const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sj + s0), mv));
                                _mm512_storeu_ps(sj + s0, e);
                                va = _mm512_add_ps(va, e);
                            }
                            sum = _mm512_reduce_add_ps(va);
                        }
#endif
                        for (int s = s0; s < n; s++) { sj[s] = std::exp(sj[s] - mn); sum += sj[s]; }
                        for (int s = n; s < nmax + 1 && s < KBLK; s++) sj[s] = 0.f;
                        if (n > 0) {
                            corr[j] = std::exp(mo - mn);   // 0 on the first keys
                            m[jb + j] = mn;
                            l[jb + j] = l[jb + j] * corr[j] + sum;
                        } else {
                            corr[j] = 1.f;
                        }
#ifdef K2_BF16DP
                        if (dp)   // bf16 in key order: the dwords are the key pairs (vcvtne2ps2bf16: nearest even)
                            for (int s = 0; s < nmax; s += 32)
                                _mm512_storeu_si512(pb.data() + (size_t)j * (KBLK / 2) + s / 2,
                                                    (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sj + s + 16),
                                                                                 _mm512_loadu_ps(sj + s)));
#endif
                    }
#ifdef K2_BF16DP
                    if (dp)
                        pv_block_dp(ob.data(), Dv, nq, pb.data(), KBLK,
                                    vb + ((size_t)h * (Sp / 2) + k0 / 2) * Dvp * 2, Dvp, Dv, nmax);
                    else
#endif
                    pv_block(ob.data(), Dv, nq, sc.data(), KBLK, vrow(k0, h), kv.v_tok, Dv, nmax);
                    for (int j = 0; j < nq; j++) {
                        float* aj = acc.data() + (size_t)(jb + j) * Dv;
                        const float* oj = ob.data() + (size_t)j * Dv;
                        const float cj = corr[j];
                        #pragma omp simd
                        for (int c = 0; c < Dv; c++) aj[c] = aj[c] * cj + oj[c];
                    }
                }
            }
            for (int j = 0; j < nqs; j++) {
                float* oj = out + ((size_t)(ts + j) * H + h) * Dv;
                const float* aj = acc.data() + (size_t)j * Dv;
                const float lj = l[j] > 0.f ? m[j] + std::log(l[j]) : -INFINITY;
                const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
                if (lse && merge) {   // out = (out·e^lse + this·e^lj) / (e^lse + e^lj)
                    float* lo = lse + (size_t)(ts + j) * H + h;
                    const float M = std::max(*lo, lj);
                    if (M == -INFINITY) continue;
                    const float a = std::exp(*lo - M), b = std::exp(lj - M), w = 1.f / (a + b);
                    for (int c = 0; c < Dv; c++) oj[c] = (oj[c] * a + aj[c] * inv * b) * w;
                    *lo = M + std::log(a + b);
                } else {
                    for (int c = 0; c < Dv; c++) oj[c] = aj[c] * inv;
                    if (lse) lse[(size_t)(ts + j) * H + h] = lj;
                }
            }
        }
    }
}
