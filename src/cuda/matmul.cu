// GEMV-shaped matmuls for k2lite._cuda: y[T,N] = x[T,I] · W[N,I]ᵀ, W in bf16 or in
// compressed-tensors INT4 (pack-quantized), x and y float32. Contracts: k2lite/ref.py
// bf16_matmul / int4_matmul. Decode (T = 1) is bound by reading W once from HBM, so:
//   - one warp per output row n; its 32 lanes stride along the row with 16-byte loads of W
//     (8 bf16 or 32 INT4 codes per lane per step: 512 B per warp per step, fully coalesced);
//   - up to TT <= 16 tokens per launch share each loaded W vector (fp32 accumulators acc[TT]),
//     larger T runs in chunks of 16;
//   - the per-lane partial sums are reduced with __shfl_xor_sync, lane 0 writes y.
// x is staged on the device with rows padded with zeros to a multiple of 8 floats (and to a
// multiple of 16 tokens), so x loads are aligned float4s and tails of W need no x masking.
// W rows that are not 16-byte aligned (I % 8 != 0 for bf16, ceil(I/8) % 4 != 0 for INT4)
// take a scalar path (2-byte / 4-byte loads) of the same kernel.
//
// Host side: every CUDA call is checked and a failure throws std::runtime_error carrying
// cudaGetErrorString (pybind11 turns it into RuntimeError). One default stream; each call
// copies x in, launches, copies y out and synchronizes. A process-wide mutex guards the
// grow-only staging buffers (the bindings release the GIL).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        cudaGetLastError();  // clear a non-sticky error so later calls can proceed
        throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
    }
}
#define K2_CHECK(call) check((call), #call)

constexpr int WARPS = 8;          // warps (= output rows) per block
constexpr int TMAX = 16;          // tokens per launch

__device__ __forceinline__ float bf16f(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Round to the nearest bf16, ties to even, kept as a float (formats.f32_to_bf16; NaN is not
// special-cased: (u-8)·scale is NaN only for a NaN scale, and then ref's row is NaN too).
__device__ __forceinline__ float round_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return __uint_as_float(u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

template <int TT>
__device__ __forceinline__ void store_rows(float* y, const float (&acc)[TT], int nt, int N, int n, int lane) {
#pragma unroll
    for (int t = 0; t < TT; t++) {
        const float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) y[(size_t)t * N + n] = s;
    }
}

// acc[t] += Σ_j w[j] x[t, i0 + j], j < 8; x rows have stride ldx (a multiple of 8 floats).
template <int TT>
__device__ __forceinline__ void fma8(float (&acc)[TT], const float (&w)[8], const float* __restrict__ x,
                                     size_t ldx, int i0) {
#pragma unroll
    for (int t = 0; t < TT; t++) {
        const float4* xv = reinterpret_cast<const float4*>(x + t * ldx + i0);
        const float4 a = __ldg(xv), b = __ldg(xv + 1);
        acc[t] = fmaf(w[0], a.x, acc[t]);
        acc[t] = fmaf(w[1], a.y, acc[t]);
        acc[t] = fmaf(w[2], a.z, acc[t]);
        acc[t] = fmaf(w[3], a.w, acc[t]);
        acc[t] = fmaf(w[4], b.x, acc[t]);
        acc[t] = fmaf(w[5], b.y, acc[t]);
        acc[t] = fmaf(w[6], b.z, acc[t]);
        acc[t] = fmaf(w[7], b.w, acc[t]);
    }
}

// ---------------------------------------------------------------- bf16
// y[t, n] for t < nt <= TT; x has TT valid (zero-padded) rows of stride ldx.
template <int TT, bool VEC>
__global__ void __launch_bounds__(WARPS * 32)
bf16_gemv(float* __restrict__ y, const float* __restrict__ x, size_t ldx, const uint16_t* __restrict__ w,
          int nt, int I, int N) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (n >= N) return;  // whole warp leaves together: the shuffles below stay full-warp
    const uint16_t* row = w + (size_t)n * I;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.f;
    if (VEC) {  // I % 8 == 0: row is 16-byte aligned, I/8 uint4 per row
        const uint4* rv = reinterpret_cast<const uint4*>(row);
        const int nv = I >> 3;
#pragma unroll 2
        for (int v = lane; v < nv; v += 32) {
            const uint4 p = __ldg(rv + v);
            float wf[8] = {bf16f(p.x & 0xFFFFu), bf16f(p.x >> 16), bf16f(p.y & 0xFFFFu), bf16f(p.y >> 16),
                           bf16f(p.z & 0xFFFFu), bf16f(p.z >> 16), bf16f(p.w & 0xFFFFu), bf16f(p.w >> 16)};
            fma8<TT>(acc, wf, x, ldx, v << 3);
        }
    } else {    // any I: one bf16 per lane per step (coalesced 64-byte warp loads)
        for (int i = lane; i < I; i += 32) {
            const float wf = bf16f(__ldg(row + i));
#pragma unroll
            for (int t = 0; t < TT; t++) acc[t] = fmaf(wf, __ldg(x + t * ldx + i), acc[t]);
        }
    }
    store_rows<TT>(y, acc, nt, N, n, lane);
}

// ---------------------------------------------------------------- INT4
// One packed word = 8 codes for columns 8k .. 8k+7 (nibble j = column 8k+j, LSB first, stored
// u = q + 8). W = (u - 8) · scale[n, i / group], rounded to bf16 when the scales are bf16.
template <bool SF32>
__device__ __forceinline__ float int4_scale(const void* scales, size_t idx) {
    if (SF32) return __ldg(static_cast<const float*>(scales) + idx);
    return bf16f(__ldg(static_cast<const uint16_t*>(scales) + idx));
}

template <int TT, bool SF32>
__device__ __forceinline__ void int4_word(float (&acc)[TT], uint32_t word, int k, const void* srow,
                                          int group, bool g8, const float* __restrict__ x, size_t ldx) {
    const int i0 = k << 3;
    float wf[8];
    if (g8) {   // group % 8 == 0: the word lies in one group
        const float s = int4_scale<SF32>(srow, i0 / group);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float v = (float)((int)((word >> (4 * j)) & 15u) - 8) * s;
            wf[j] = SF32 ? v : round_bf16(v);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float s = int4_scale<SF32>(srow, (i0 + j) / group);  // i0 + j < I: see int4_gemv
            const float v = (float)((int)((word >> (4 * j)) & 15u) - 8) * s;
            wf[j] = SF32 ? v : round_bf16(v);
        }
    }
    // Columns >= I in the last word (padding codes) meet zero-padded x: they add 0.
    fma8<TT>(acc, wf, x, ldx, i0);
}

template <int TT, bool VEC, bool SF32>
__global__ void __launch_bounds__(WARPS * 32)
int4_gemv(float* __restrict__ y, const float* __restrict__ x, size_t ldx, const int32_t* __restrict__ packed,
          const void* __restrict__ scales, int nt, int I, int N, int group) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const int words = (I + 7) >> 3, ng = (I + group - 1) / group;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(packed) + (size_t)n * words;
    const size_t soff = (size_t)n * ng;
    const void* srow = SF32 ? (const void*)(static_cast<const float*>(scales) + soff)
                            : (const void*)(static_cast<const uint16_t*>(scales) + soff);
    const bool g8 = (group & 7) == 0;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.f;
    // Scale indices past ng - 1 can only arise for padding columns (i >= I) when group % 8 != 0;
    // the full-word loop handles every word but the last, which takes the guarded path.
    const int full = (g8 || I % 8 == 0) ? words : words - 1;
    if (VEC) {  // words % 4 == 0: 16-byte aligned rows, 4 words (32 codes) per lane per step
        const uint4* rv = reinterpret_cast<const uint4*>(row);
        const int nv = full >> 2;  // the launch picks VEC only when full == words and words % 4 == 0
#pragma unroll 2
        for (int v = lane; v < nv; v += 32) {
            const uint4 p = __ldg(rv + v);
            int4_word<TT, SF32>(acc, p.x, 4 * v + 0, srow, group, g8, x, ldx);
            int4_word<TT, SF32>(acc, p.y, 4 * v + 1, srow, group, g8, x, ldx);
            int4_word<TT, SF32>(acc, p.z, 4 * v + 2, srow, group, g8, x, ldx);
            int4_word<TT, SF32>(acc, p.w, 4 * v + 3, srow, group, g8, x, ldx);
        }
    } else {
        for (int k = lane; k < full; k += 32) int4_word<TT, SF32>(acc, __ldg(row + k), k, srow, group, g8, x, ldx);
    }
    if (full < words && lane == 0) {  // last, partial word with group % 8 != 0: per column, clamped
        const int k = words - 1, i0 = k << 3;
        const uint32_t word = __ldg(row + k);
        float wf[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int i = i0 + j;
            const float s = i < I ? int4_scale<SF32>(srow, i / group) : 0.f;
            const float v = (float)((int)((word >> (4 * j)) & 15u) - 8) * s;
            wf[j] = SF32 ? v : round_bf16(v);
        }
        fma8<TT>(acc, wf, x, ldx, i0);
    }
    store_rows<TT>(y, acc, nt, N, n, lane);
}

// ---------------------------------------------------------------- host staging
std::mutex g_mu;
float* g_x = nullptr;   // [Tpad, ldx] zero-padded activations
float* g_y = nullptr;   // [T, N]
size_t g_x_bytes = 0, g_y_bytes = 0;

void reserve(float*& p, size_t& have, size_t need) {
    if (need <= have) return;
    if (p) cudaFree(p);
    p = nullptr;
    have = 0;
    K2_CHECK(cudaMalloc(&p, need));
    have = need;
}

// Copies x[T, I] into g_x with rows of ldx floats (zeros past I) and Tpad rows (zeros past T).
size_t stage_x(const float* x, int T, int I, int Tpad) {
    const size_t ldx = ((size_t)I + 7) & ~(size_t)7;
    const size_t bytes = (size_t)Tpad * ldx * sizeof(float);
    reserve(g_x, g_x_bytes, bytes);
    if (ldx != (size_t)I || Tpad != T) K2_CHECK(cudaMemsetAsync(g_x, 0, bytes, 0));
    K2_CHECK(cudaMemcpy2DAsync(g_x, ldx * sizeof(float), x, (size_t)I * sizeof(float),
                               (size_t)I * sizeof(float), T, cudaMemcpyHostToDevice, 0));
    return ldx;
}

int pick_tt(int rem) { return rem >= 16 ? 16 : rem > 4 ? 8 : rem > 2 ? 4 : rem; }

template <class Launch>
void for_chunks(float* y_host, const float* x_host, int T, int I, int N, Launch launch) {
    std::lock_guard<std::mutex> lock(g_mu);
    if (T <= 0 || N <= 0) return;
    if (I <= 0) {
        std::memset(y_host, 0, (size_t)T * N * sizeof(float));
        return;
    }
    // rows the launches read: whole chunks of 16, then the last chunk's TT (>= its token count)
    const int Tpad = T / TMAX * TMAX + (T % TMAX ? pick_tt(T % TMAX) : 0);
    const size_t ldx = stage_x(x_host, T, I, Tpad);
    reserve(g_y, g_y_bytes, (size_t)T * N * sizeof(float));
    const dim3 grid((N + WARPS - 1) / WARPS), block(WARPS * 32);
    for (int t0 = 0; t0 < T; t0 += TMAX) {
        const int nt = T - t0 < TMAX ? T - t0 : TMAX;
        launch(pick_tt(nt), grid, block, g_y + (size_t)t0 * N, g_x + (size_t)t0 * ldx, ldx, nt);
        K2_CHECK(cudaGetLastError());
    }
    K2_CHECK(cudaMemcpyAsync(y_host, g_y, (size_t)T * N * sizeof(float), cudaMemcpyDeviceToHost, 0));
    K2_CHECK(cudaStreamSynchronize(0));
}

template <int TT>
void launch_bf16(dim3 g, dim3 b, bool vec, float* y, const float* x, size_t ldx, const uint16_t* w, int nt, int I,
                 int N) {
    if (vec) bf16_gemv<TT, true><<<g, b>>>(y, x, ldx, w, nt, I, N);
    else bf16_gemv<TT, false><<<g, b>>>(y, x, ldx, w, nt, I, N);
}

template <int TT>
void launch_int4(dim3 g, dim3 b, bool vec, bool f32, float* y, const float* x, size_t ldx, const int32_t* p,
                 const void* s, int nt, int I, int N, int group) {
    if (vec && f32) int4_gemv<TT, true, true><<<g, b>>>(y, x, ldx, p, s, nt, I, N, group);
    else if (vec) int4_gemv<TT, true, false><<<g, b>>>(y, x, ldx, p, s, nt, I, N, group);
    else if (f32) int4_gemv<TT, false, true><<<g, b>>>(y, x, ldx, p, s, nt, I, N, group);
    else int4_gemv<TT, false, false><<<g, b>>>(y, x, ldx, p, s, nt, I, N, group);
}

}  // namespace

// ---------------------------------------------------------------- device memory
void* k2_cuda_upload(const void* host, size_t nbytes) {
    if (nbytes == 0) return nullptr;
    void* p = nullptr;
    K2_CHECK(cudaMalloc(&p, nbytes));
    const cudaError_t e = cudaMemcpy(p, host, nbytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        cudaFree(p);
        check(e, "cudaMemcpy (upload)");
    }
    return p;
}

void k2_cuda_free(void* p) noexcept {
    if (p) cudaFree(p);  // errors ignored: may run at interpreter exit after the runtime unloads
}

// ---------------------------------------------------------------- matmuls (host x, y; device W)
void k2_cuda_bf16_matmul(float* y, const float* x, const void* w, int T, int I, int N) {
    const uint16_t* wd = static_cast<const uint16_t*>(w);
    const bool vec = I % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
    for_chunks(y, x, T, I, N, [&](int tt, dim3 g, dim3 b, float* yd, const float* xd, size_t ldx, int nt) {
        switch (tt) {
            case 1: launch_bf16<1>(g, b, vec, yd, xd, ldx, wd, nt, I, N); break;
            case 2: launch_bf16<2>(g, b, vec, yd, xd, ldx, wd, nt, I, N); break;
            case 4: launch_bf16<4>(g, b, vec, yd, xd, ldx, wd, nt, I, N); break;
            case 8: launch_bf16<8>(g, b, vec, yd, xd, ldx, wd, nt, I, N); break;
            default: launch_bf16<16>(g, b, vec, yd, xd, ldx, wd, nt, I, N); break;
        }
    });
}

void k2_cuda_int4_matmul(float* y, const float* x, const void* packed, const void* scales, bool scales_f32, int T,
                         int I, int N, int group) {
    if (group <= 0) throw std::invalid_argument("group_size must be positive");
    const int32_t* pd = static_cast<const int32_t*>(packed);
    const int words = (I + 7) / 8;
    // vector path: 16-byte aligned rows and no guarded last word (see int4_gemv `full`)
    const bool vec = words % 4 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                     (group % 8 == 0 || I % 8 == 0);
    for_chunks(y, x, T, I, N, [&](int tt, dim3 g, dim3 b, float* yd, const float* xd, size_t ldx, int nt) {
        switch (tt) {
            case 1: launch_int4<1>(g, b, vec, scales_f32, yd, xd, ldx, pd, scales, nt, I, N, group); break;
            case 2: launch_int4<2>(g, b, vec, scales_f32, yd, xd, ldx, pd, scales, nt, I, N, group); break;
            case 4: launch_int4<4>(g, b, vec, scales_f32, yd, xd, ldx, pd, scales, nt, I, N, group); break;
            case 8: launch_int4<8>(g, b, vec, scales_f32, yd, xd, ldx, pd, scales, nt, I, N, group); break;
            default: launch_int4<16>(g, b, vec, scales_f32, yd, xd, ldx, pd, scales, nt, I, N, group); break;
        }
    });
}
