// Absorbed MLA decode over the paged latent cache (K2_SPEC §3.4): per sequence b and head h,
// u[b,h] = Σ_t softmax_t(scale·(q_latent·c_t + q_pe·k_pe_t)) · c_t, t < lengths[b].
// All heads share each cached token (C+R floats), so work items are (sequence, head chunk)
// and tokens stream in blocks that stay in L2 while every head of the chunk visits them.
// Softmax is fp32 and streaming (running max m, running sum l, rescaled accumulator).
#include "common.h"
#include <vector>
#include <algorithm>

void mla_decode(float* out, const float* q_latent, const float* q_pe, const float* pool,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale) {
    const int W = C + R;               // floats per cached token
    const int HC = 8;                  // heads per work item
    const int BS = 64;                 // tokens per block
    const int nhc = ceil_div(H, HC);
    #pragma omp parallel
    {
        std::vector<float> acc((size_t)HC * C), m(HC), l(HC), s(BS);
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
                    int t = t0 + j;
                    rows[j] = pool + ((size_t)page_table[(size_t)b * max_pages + t / page] * page + t % page) * W;
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
            for (int b = 0; b < B; b++)
                std::memcpy(&uh[(size_t)b * C], u + ((size_t)b * H + h) * C, sizeof(float) * C);
            bf16_rows(out + (size_t)h * V, H * V, uh.data(), B, C, kv_b + ((size_t)h * (N + V) + N) * C, 0, V);
        }
    }
}
