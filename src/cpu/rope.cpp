// RoPE on interleaved pairs (2i, 2i+1) of x[T,H,R], angle positions[t]·inv_freq[i] in fp32
// (the same rounding as ref.rope, which forms theta in float32 before cos/sin).
#include "common.h"
#include <vector>

void rope(float* out, const float* x, const int64_t* positions, const float* inv_freq,
          int T, int H, int R) {
    const int P = R / 2;
    // a batched decode step's few rows take microseconds: waking the other thread costs more
    #pragma omp parallel if ((size_t)T * H * R >= (1u << 20))
    {
        std::vector<float> cs(P), sn(P);
        #pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            const float pos = (float)positions[t];
            for (int i = 0; i < P; i++) {
                const float th = pos * inv_freq[i];
                cs[i] = std::cos(th);
                sn[i] = std::sin(th);
            }
            for (int h = 0; h < H; h++) {
                const float* xi = x + ((size_t)t * H + h) * R;
                float* o = out + ((size_t)t * H + h) * R;
                for (int i = 0; i < P; i++) {
                    const float x0 = xi[2 * i], x1 = xi[2 * i + 1];
                    o[2 * i] = x0 * cs[i] - x1 * sn[i];
                    o[2 * i + 1] = x1 * cs[i] + x0 * sn[i];
                }
            }
        }
    }
}
