// INT4 matmul over formats.TiledInt4 (the repack=True layout of routed experts): y[T,N] =
// x[T,I] · W[N,I]ᵀ. With AVX512-VNNI the tiles are read in place (int4_tiles_q8 in
// int4_matmul_vnni.cpp); otherwise (AVX2/scalar builds, exact mode) each tile is first unpacked
// into the checkpoint's row layout, 16 rows at a time, and run through int4_rows.
#include "common.h"
#include <vector>

static const int TR = 16, TB = 1152;

void int4_tiled_rows(float* y, int ldy, const float* xp, int T, int I, const uint8_t* data,
                     int n0, int n1) {
    const int nb = ceil_div(I, 128), wpr = I / 8, spr = I / 32;   // words, scales per row
    std::vector<int32_t> packed((size_t)TR * wpr);
    std::vector<uint16_t> scales((size_t)TR * spr);
    std::vector<float> s((size_t)T * TR);
    for (int n = n0; n < n1; n += TR) {
        const uint8_t* tile = data + (size_t)(n / TR) * nb * TB;
        for (int r = 0; r < TR; r++)
            for (int b = 0; b < nb; b++) {
                const uint8_t* blk = tile + (size_t)b * TB;
                const int cols = I - 128 * b < 128 ? I - 128 * b : 128;
                std::memcpy((uint8_t*)&packed[(size_t)r * wpr] + 64 * b, blk + 64 * r, cols / 2);
                std::memcpy(&scales[(size_t)r * spr + 4 * b], blk + TR * 64 + 8 * r, cols / 32 * 2);
            }
        const int nr = n1 - n < TR ? n1 - n : TR;
        int4_rows(s.data(), TR, xp, T, I, packed.data(), scales.data(), false, 32, 0, nr);
        for (int t = 0; t < T; t++)
            for (int r = 0; r < nr; r++) y[(size_t)t * ldy + n + r] = s[(size_t)t * TR + r];
    }
}

void int4_tiled_matmul(float* out, const float* x, const uint8_t* data, int T, int I, int N) {
    const int ntiles = ceil_div(N, TR);
    if (int4_vnni(I, 32, false)) {
        const size_t qb = int4_q8_bytes(I);
        std::vector<uint8_t> buf((size_t)T * qb + 64);
        uint8_t* base = (uint8_t*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);
        std::vector<const void*> xt(T);
        for (int t = 0; t < T; t++) {
            int4_quant_x(base + t * qb, x + (size_t)t * I, I);
            xt[t] = base + t * qb;
        }
        // 4 tiles (~256 KiB at I = 7168) per item: L2-resident across token chunks
        const int per = 4, items = ceil_div(ntiles, per);
        #pragma omp parallel for schedule(dynamic, 1) if (items > 1)
        for (int it = 0; it < items; it++) {
            const int n0 = it * per * TR, n1 = n0 + per * TR < N ? n0 + per * TR : N;
            int4_tiles_q8(out, N, xt.data(), T, I, data, n0, n1);
        }
        return;
    }
    std::vector<float> xp((size_t)T * I);
    int4_prep_x(xp.data(), x, T, I, 32, false);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int it = 0; it < ntiles; it++) {
        const int n0 = it * TR, n1 = n0 + TR < N ? n0 + TR : N;
        int4_tiled_rows(out, N, xp.data(), T, I, data, n0, n1);
    }
}
