// RMSNorm: out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w, fp32 (sum of squares in double).
#include "common.h"

void rmsnorm(float* out, const float* x, const float* w, int T, int D, float eps) {
    // a batched decode step's few rows take microseconds: waking the other thread costs more
    #pragma omp parallel for schedule(static) if ((size_t)T * D >= (1u << 20))
    for (int t = 0; t < T; t++) {
        const float* xt = x + (size_t)t * D;
        float* o = out + (size_t)t * D;
        double ss = 0.0;
        #pragma omp simd reduction(+:ss)
        for (int i = 0; i < D; i++) ss += (double)xt[i] * xt[i];
        const float r = std::sqrt((float)(ss / D) + eps);
        for (int i = 0; i < D; i++) o[i] = (xt[i] / r) * w[i];   // divide, as ref
    }
}
