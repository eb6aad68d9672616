// Benchmark helper: the machine's streaming read bandwidth, as a parallel sum over n floats.
#include "common.h"

double stream_read(const float* x, int64_t n) {
    double total = 0.0;
    #pragma omp parallel for schedule(static) reduction(+:total)
    for (int64_t i0 = 0; i0 < n; i0 += 4096) {
        int64_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t i = i0; i < i1; i++) s += x[i];
        total += s;
    }
    return total;
}
