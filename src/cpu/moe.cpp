// Routed-expert sum: out[t] = Σ_k weights[t,k] · down(silu(gate·x_t) ⊙ up·x_t) of expert idx[t,k].
// Only the chosen experts arrive here (lidx holds local ids 0..n_used-1). Slots (t,k) are
// grouped by expert so each expert's weights stream from memory once for all its tokens.
// Three parallel phases: gate/up rows + SwiGLU, down rows, then a per-token weighted sum in
// k order (deterministic, and a token that picks an expert twice simply gets two slots).
// INT4 experts with bf16 scales take moe_q8 (int8 activations, VNNI, a single barrier).
#include "common.h"
#include <vector>

static void mat_rows(float* y, int ldy, const float* xp, int T, int I, const ExpertMats& e, int m,
                     int fmt, int group, int n0, int n1) {
    if (fmt == MOE_FP8)
        fp8_rows(y, ldy, xp, T, I, (const uint8_t*)e.q[m], (const float*)e.s[m], e.block[m][0],
                 e.block[m][1], n0, n1);
    else if (fmt == MOE_INT4)
        int4_rows(y, ldy, xp, T, I, (const int32_t*)e.q[m], e.s[m], e.s_f32[m], group, n0, n1);
    else
        bf16_rows(y, ldy, xp, T, I, (const uint16_t*)e.q[m], n0, n1);
}

static inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// o[0..n) = Σ_k w[k] · y[slot[k] * ldy + 0..n), in k order (one token's expert outputs).
static void weighted_sum(float* o, int n, const float* w, const int* slot, int K, const float* y, size_t ldy) {
    for (int d = 0; d < n; d++) o[d] = 0.f;
    for (int k = 0; k < K; k++) {
        const float* ys = y + (size_t)slot[k] * ldy;
        #pragma omp simd
        for (int d = 0; d < n; d++) o[d] += w[k] * ys[d];
    }
}

static uint8_t* aligned_bytes(std::vector<uint8_t>& v, size_t bytes) {
    v.resize(bytes + 64);
    return align64(v.data());
}

// The INT4 x int8 (VNNI) path: one parallel region with a single barrier. x is quantized once
// per token. Phase 1 items = (expert, 128-row block of F): gate and up rows for the expert's
// tokens, SwiGLU, and the int8 quantization of that block of h (a 128-row block of gate/up is
// exactly one 128-column block of down's input). Phase 2 items = row blocks of D over all
// used experts, each item also doing the weighted sum of its columns of out in k order.
static void moe_q8(float* out, const float* x, const float* weights, const ExpertMats* experts,
                   int n_used, int group, int T, int D, int F, int K, const std::vector<int>& start,
                   const std::vector<int>& slot_tok, const std::vector<int>& pos) {
    const int S = T * K;
    const size_t qd = int4_q8_bytes(D), qf = int4_q8_bytes(F);
    std::vector<uint8_t> xbuf, hbuf;
    uint8_t* xq = aligned_bytes(xbuf, (size_t)T * qd);
    uint8_t* hq = aligned_bytes(hbuf, (size_t)S * qf);
    for (int t = 0; t < T; t++) int4_quant_x(xq + t * qd, x + (size_t)t * D, D);
    std::vector<const void*> xs(S), hs(S);            // per slot, in expert order
    for (int p = 0; p < S; p++) { xs[p] = xq + slot_tok[p] * qd; hs[p] = hq + p * qf; }
    // rows per item: RF of gate/up (2 x 128 x D/2 bytes) and RD of down for every used expert
    // (8 x 256 x F/2 bytes at K2 sizes); both a multiple of 128 / 4 rows, long enough that the
    // kernel's prefetch past an item's last row (16+ KiB) costs little bandwidth
    const int RF = 128, RD = 256;
    const int nbf = ceil_div(F, RF), nbd = ceil_div(D, RD);
    #pragma omp parallel
    {
        std::vector<float> g((size_t)S * RF), h((size_t)S * RF), y((size_t)S * RD);
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_used * nbf; it++) {
            const int u = it / nbf, r0 = (it % nbf) * RF, r1 = r0 + RF < F ? r0 + RF : F, nr = r1 - r0;
            const int p0 = start[u], nt = start[u + 1] - p0;
            if (nt == 0) continue;
            const ExpertMats& e = experts[u];
            int4_rows_q8(g.data() - r0, RF, &xs[p0], nt, D, (const int32_t*)e.q[0],
                         (const uint16_t*)e.s[0], group, r0, r1);
            int4_rows_q8(h.data() - r0, RF, &xs[p0], nt, D, (const int32_t*)e.q[1],
                         (const uint16_t*)e.s[1], group, r0, r1);
            for (int t = 0; t < nt; t++) {
                float* ht = &h[(size_t)t * RF];
                const float* gt = &g[(size_t)t * RF];
                for (int r = 0; r < nr; r++) ht[r] = silu_mul(gt[r], ht[r]);
                int4_quant_x(hq + (p0 + t) * qf + (size_t)(r0 / 128) * Q8_BLOCK_BYTES, ht, nr);
            }
        }
        #pragma omp for schedule(dynamic, 1) nowait
        for (int it = 0; it < nbd; it++) {
            const int r0 = it * RD, r1 = r0 + RD < D ? r0 + RD : D, nr = r1 - r0;
            for (int u = 0; u < n_used; u++) {
                const int p0 = start[u], nt = start[u + 1] - p0;
                if (nt == 0) continue;
                const ExpertMats& e = experts[u];
                int4_rows_q8(&y[(size_t)p0 * RD] - r0, RD, &hs[p0], nt, F, (const int32_t*)e.q[2],
                             (const uint16_t*)e.s[2], group, r0, r1);
            }
            for (int t = 0; t < T; t++)
                weighted_sum(out + (size_t)t * D + r0, nr, weights + (size_t)t * K, &pos[t * K], K, y.data(), RD);
        }
    }
}

void moe(float* out, const float* x, const int32_t* lidx, const float* weights,
         const ExpertMats* experts, int n_used, int fmt, int group, int T, int D, int F, int K) {
    const bool int4 = fmt == MOE_INT4;
    const int S = T * K;   // slots
    // counting sort of slots by expert: start[u]..start[u+1] are expert u's slots
    std::vector<int> start(n_used + 1, 0), slot_tok(S), pos(S);
    for (int s = 0; s < S; s++) start[lidx[s] + 1]++;
    for (int u = 0; u < n_used; u++) start[u + 1] += start[u];
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int s = 0; s < S; s++) { int p = fill[lidx[s]]++; slot_tok[p] = s / K; pos[s] = p; }
    if (int4 && int4_vnni(D, group, experts[0].s_f32[0]) && int4_vnni(F, group, false)) {
        moe_q8(out, x, weights, experts, n_used, group, T, D, F, K, start, slot_tok, pos);
        return;
    }

    std::vector<float> xs((size_t)S * D), g((size_t)S * F), h((size_t)S * F), hp((size_t)S * F),
        y((size_t)S * D);
    const int RB = 32;                                   // rows per work item
    const int nbf = ceil_div(F, RB), nbd = ceil_div(D, RB);
    #pragma omp parallel
    {
        // gather x per slot, prepared for the first matmul (de-interleaved for the SIMD kernels)
        #pragma omp for schedule(static)
        for (int p = 0; p < S; p++) {
            const float* xt = x + (size_t)slot_tok[p] * D;
            if (int4) int4_prep_x(&xs[(size_t)p * D], xt, 1, D, group, experts[0].s_f32[0]);
            else if (fmt == MOE_BF16) bf16_prep_x(&xs[(size_t)p * D], xt, 1, D);
            else std::memcpy(&xs[(size_t)p * D], xt, sizeof(float) * D);
        }
        // phase 1: gate and up rows of each expert block, then h = silu(g) * u on that block
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_used * nbf; it++) {
            int u = it / nbf, r0 = (it % nbf) * RB, r1 = r0 + RB < F ? r0 + RB : F;
            int p0 = start[u], nt = start[u + 1] - p0;
            if (nt == 0) continue;
            const float* xu = &xs[(size_t)p0 * D];
            mat_rows(&g[(size_t)p0 * F], F, xu, nt, D, experts[u], 0, fmt, group, r0, r1);
            mat_rows(&h[(size_t)p0 * F], F, xu, nt, D, experts[u], 1, fmt, group, r0, r1);
            for (int t = 0; t < nt; t++)
                for (int r = r0; r < r1; r++) {
                    size_t i = (size_t)(p0 + t) * F + r;
                    float gv = g[i];
                    h[i] = gv / (1.f + std::exp(-gv)) * h[i];
                }
        }
        #pragma omp for schedule(static)
        for (int p = 0; p < S; p++) {
            if (int4) int4_prep_x(&hp[(size_t)p * F], &h[(size_t)p * F], 1, F, group, experts[0].s_f32[2]);
            else if (fmt == MOE_BF16) bf16_prep_x(&hp[(size_t)p * F], &h[(size_t)p * F], 1, F);
            else std::memcpy(&hp[(size_t)p * F], &h[(size_t)p * F], sizeof(float) * F);
        }
        // phase 2: down rows
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_used * nbd; it++) {
            int u = it / nbd, r0 = (it % nbd) * RB, r1 = r0 + RB < D ? r0 + RB : D;
            int p0 = start[u], nt = start[u + 1] - p0;
            if (nt == 0) continue;
            mat_rows(&y[(size_t)p0 * D], D, &hp[(size_t)p0 * F], nt, F, experts[u], 2, fmt, group, r0, r1);
        }
        // phase 3: out[t] = Σ_k w[t,k] y[slot(t,k)]
        #pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            weighted_sum(out + (size_t)t * D, D, weights + (size_t)t * K, &pos[t * K], K, y.data(), D);
    }
}
