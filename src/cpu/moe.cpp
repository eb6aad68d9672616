// Routed-expert sum: out[t] = Σ_k weights[t,k] · down(silu(gate·x_t) ⊙ up·x_t) of expert idx[t,k].
// Only the chosen experts arrive here (lidx holds local ids 0..n_used-1). Slots (t,k) are
// grouped by expert so each expert's weights stream from memory once for all its tokens.
// Three parallel phases: gate/up rows + SwiGLU, down rows, then a per-token weighted sum in
// k order (deterministic, and a token that picks an expert twice simply gets two slots).
#include "common.h"
#include <vector>

static void mat_rows(float* y, int ldy, const float* xp, int T, int I, const ExpertMats& e, int m,
                     bool int4, int group, int n0, int n1) {
    if (int4)
        int4_rows(y, ldy, xp, T, I, (const int32_t*)e.q[m], e.s[m], e.s_f32[m], group, n0, n1);
    else
        bf16_rows(y, ldy, xp, T, I, (const uint16_t*)e.q[m], n0, n1);
}

void moe(float* out, const float* x, const int32_t* lidx, const float* weights,
         const ExpertMats* experts, int n_used, bool int4, int group, int T, int D, int F, int K) {
    const int S = T * K;   // slots
    // counting sort of slots by expert: start[u]..start[u+1] are expert u's slots
    std::vector<int> start(n_used + 1, 0), slot_tok(S), pos(S);
    for (int s = 0; s < S; s++) start[lidx[s] + 1]++;
    for (int u = 0; u < n_used; u++) start[u + 1] += start[u];
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int s = 0; s < S; s++) { int p = fill[lidx[s]]++; slot_tok[p] = s / K; pos[s] = p; }

    std::vector<float> xs((size_t)S * D), g((size_t)S * F), h((size_t)S * F), hp((size_t)S * F),
        y((size_t)S * D);
    const int RB = 32;                                   // rows per work item
    const int nbf = ceil_div(F, RB), nbd = ceil_div(D, RB);
    #pragma omp parallel
    {
        // gather x per slot, prepared for the first matmul (de-interleaved on the INT4 path)
        #pragma omp for schedule(static)
        for (int p = 0; p < S; p++) {
            const float* xt = x + (size_t)slot_tok[p] * D;
            if (int4) int4_prep_x(&xs[(size_t)p * D], xt, 1, D, group, experts[0].s_f32[0]);
            else std::memcpy(&xs[(size_t)p * D], xt, sizeof(float) * D);
        }
        // phase 1: gate and up rows of each expert block, then h = silu(g) * u on that block
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_used * nbf; it++) {
            int u = it / nbf, r0 = (it % nbf) * RB, r1 = r0 + RB < F ? r0 + RB : F;
            int p0 = start[u], nt = start[u + 1] - p0;
            if (nt == 0) continue;
            const float* xu = &xs[(size_t)p0 * D];
            mat_rows(&g[(size_t)p0 * F], F, xu, nt, D, experts[u], 0, int4, group, r0, r1);
            mat_rows(&h[(size_t)p0 * F], F, xu, nt, D, experts[u], 1, int4, group, r0, r1);
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
            else std::memcpy(&hp[(size_t)p * F], &h[(size_t)p * F], sizeof(float) * F);
        }
        // phase 2: down rows
        #pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_used * nbd; it++) {
            int u = it / nbd, r0 = (it % nbd) * RB, r1 = r0 + RB < D ? r0 + RB : D;
            int p0 = start[u], nt = start[u + 1] - p0;
            if (nt == 0) continue;
            mat_rows(&y[(size_t)p0 * D], D, &hp[(size_t)p0 * F], nt, F, experts[u], 2, int4, group, r0, r1);
        }
        // phase 3: out[t] = Σ_k w[t,k] y[slot(t,k)]
        #pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            float* o = out + (size_t)t * D;
            for (int d = 0; d < D; d++) o[d] = 0.f;
            for (int k = 0; k < K; k++) {
                const float w = weights[(size_t)t * K + k];
                const float* ys = &y[(size_t)pos[t * K + k] * D];
                #pragma omp simd
                for (int d = 0; d < D; d++) o[d] += w * ys[d];
            }
        }
    }
}
