// Causal prefill attention, expanded form: q[T,H,Dk], k[S,H,Dk], v[S,H,Dv] -> out[T,H,Dv].
// Query t sits at position q_offset + t and sees keys 0..min(S-1, q_offset+t). fp32 softmax.
// Work items are (t, h) pairs; each keeps its scores in a per-thread buffer of S floats.
#include "common.h"
#include <vector>
#include <algorithm>

void attention(float* out, const float* q, const float* k, const float* v, int T, int S, int H,
               int Dk, int Dv, float scale, int q_offset) {
    #pragma omp parallel
    {
        std::vector<float> sc(S > 0 ? S : 1);
        #pragma omp for schedule(dynamic, 4)
        for (int it = 0; it < T * H; it++) {
            const int t = it / H, h = it % H;
            const int n = std::min(S, q_offset + t + 1);        // visible keys
            const float* qt = q + ((size_t)t * H + h) * Dk;
            float mx = -INFINITY;
            for (int s = 0; s < n; s++) {
                const float* ks = k + ((size_t)s * H + h) * Dk;
                float d = 0.f;
                #pragma omp simd reduction(+:d)
                for (int i = 0; i < Dk; i++) d += qt[i] * ks[i];
                sc[s] = d * scale;
                mx = std::max(mx, sc[s]);
            }
            float sum = 0.f;
            for (int s = 0; s < n; s++) { sc[s] = std::exp(sc[s] - mx); sum += sc[s]; }
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            float* o = out + ((size_t)t * H + h) * Dv;
            for (int i = 0; i < Dv; i++) o[i] = 0.f;
            for (int s = 0; s < n; s++) {
                const float p = sc[s] * inv;
                const float* vs = v + ((size_t)s * H + h) * Dv;
                #pragma omp simd
                for (int i = 0; i < Dv; i++) o[i] += p * vs[i];
            }
        }
    }
}
