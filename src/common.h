// Shared helpers and the row kernels that several ops reuse (moe calls the matmul rows).
// Conventions (llama2.c): output first, sizes explicit, no globals. Shapes use ref.py letters:
// T tokens, I inputs, N outputs, D hidden, F expert hidden, H heads, C latent, R rope dims.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <memory>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
// gcc 12 warns falsely inside the intrinsics' _mm512_undefined_*() at each inlined use
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define K2_AVX512 1
#endif

// bf16 bits are the top half of a float32: widening is exact.
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round a float to the nearest bf16 (ties to even), kept as a float: formats.f32_to_bf16.
static inline float round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

#ifdef K2_AVX512
// exp(x) for x <= 0 (Cephes expf: 2^n · poly(r), |r| <= ln2/2, ~1 ulp); scalef underflows to
// 0 cleanly, the clamp maps -inf; NaN passes through.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

// p rounded up to the next 64-byte boundary (a buffer allocated 64 bytes long enough).
template <class T>
static inline T* align64(T* p) { return (T*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

// Uninitialised float scratch of n elements. Up to 64 MB it is `kept` (a thread_local of the
// caller, reused between calls: fresh pages cost their faults); beyond, a fresh buffer held by
// `big` and freed with it, so a rare huge call does not pin its memory for the thread's life.
static inline float* kept_scratch(std::vector<float>& kept, std::unique_ptr<float[]>& big, size_t n) {
    if (n <= ((size_t)64 << 20) / sizeof(float)) {
        if (kept.size() < n) kept.resize(n);
        return kept.data();
    }
    big.reset(new float[n]);
    return big.get();
}

// ---------------------------------------------------------------- INT4 rows (int4_matmul.cpp)
// W[n, i] = (((packed[n, i/8] >> 4*(i%8)) & 15) - 8) * scale[n, i/group]; scales are bf16 bits
// (scales_f32 = false: then each W is rounded to bf16, as compressed-tensors dequantizes) or
// float32 (W unrounded). Rows are ceil(I/8) words and ceil(I/group) scales long.

// True when the SIMD path applies (I and group multiples of 32); it wants x "prepared".
bool int4_fast(int I, int group);
// xp[T, I] = x prepared for int4_rows: per token, bf16 hi[I] + lo[I] parts on the AVX512-BF16
// path (bf16 scales), even then odd columns on the fp32 SIMD path (the low / high nibbles of
// each byte), a plain copy otherwise.
void int4_prep_x(float* xp, const float* x, int T, int I, int group, bool scales_f32);
// y[t*ldy + n] = Σ_i x[t,i] W[n,i] for t < T, n0 <= n < n1; xp from int4_prep_x.
void int4_rows(float* y, int ldy, const float* xp, int T, int I, const int32_t* packed,
               const void* scales, bool scales_f32, int group, int n0, int n1);

// ---------------------------------------------------------------- INT4 x int8 (int4_matmul_vnni.cpp)
// The fast path (AVX512-VNNI, bf16 scales, I % 32 == 0, group 32/64/128 or a multiple of 128):
// x is quantized to int8 with an fp32 scale per 8 inputs, into blocks of 128 columns
// (Q8_BLOCK_BYTES each, 64-byte aligned; layout in int4_matmul_vnni.cpp); results then differ
// from ref by ~1e-5 NMSE.
// g_exact (process-wide, default false) turns it off: every INT4 op then takes the exact path
// above, and the BF16 matmuls keep fp32 activations (k2lite.cpu.set_exact).
extern bool g_exact;
#define Q8_BLOCK_BYTES 256
bool int4_vnni(int I, int group, bool scales_f32);
static inline size_t int4_q8_bytes(int ncols) { return (size_t)ceil_div(ncols, 128) * Q8_BLOCK_BYTES; }
// Quantize ncols (a multiple of 32) columns of x into ceil(ncols/128) blocks at xq.
void int4_quant_x(void* xq, const float* x, int ncols);
// y[t*ldy + n] = Σ_i x[t,i] W[n,i] for t < T, n0 <= n < n1; xq[t] = token t's quantized row.
void int4_rows_q8(float* y, int ldy, const void* const* xq, int T, int I, const int32_t* packed,
                  const uint16_t* scales, int group, int n0, int n1);

// ---------------------------------------------------------------- BF16 rows (bf16_matmul.cpp)
// y[t*ldy + n] = Σ_i x[t,i] w[n,i] for t < T, n0 <= n < n1; w is bf16 bits [N, I]; xd is x
// prepared by bf16_prep_x (same size: on the AVX-512 path each 32-column chunk de-interleaved,
// even columns then odd ones; a copy elsewhere).
void bf16_prep_x(float* xd, const float* x, int T, int I);
void bf16_rows(float* y, int ldy, const float* xd, int T, int I, const uint16_t* w, int n0, int n1);
// On AVX512-BF16 builds (K2_BF16DP) and unless g_exact, bf16_matmul and bf16_tiled_matmul take
// x rounded to bf16, as a GPU runs the model, and multiply with vdpbf16ps (32 MACs per
// instruction, twice an FMA: prefill 1.3-1.6x) in one fixed order for every (row, token): per
// chunk of BF16_DP_KC columns, 16 lane sums over 32-column steps in order, reduced, then added to
// the earlier chunks'. The order depends on neither T nor the layout, so a token's result is
// bit-identical in decode, in any prefill chunk and in a batch: bf16 rounding downstream would
// turn fp32-level differences into 2^-9 jumps (prompt caching and batching rely on it). Other
// builds and exact mode keep fp32 x (k2lite.cpu.cache_dtype follows the same rule).
#define BF16_DP_KC 2048
#if defined(K2_AVX512) && defined(__AVX512BF16__)
#define K2_BF16DP 1
// xb[t*ldx + i] = bf16(x[t*I + i]) (round to nearest even), zero for I <= i < ldx.
void bf16_round_x(uint16_t* xb, size_t ldx, const float* x, int T, int I);
#endif

// ---------------------------------------------------------------- FP8 rows (fp8_matmul.cpp)
// y[t*ldy + n] = Σ_i x[t,i] W[n,i] for t < T, n0 <= n < n1, W[n,i] = e4m3fn(w[n,i]) *
// scale_inv[n/bo, i/bi]; w is uint8 codes [N, I], scale_inv float32 [ceil(N/bo), ceil(I/bi)].
void fp8_rows(float* y, int ldy, const float* x, int T, int I, const uint8_t* w, const float* scale_inv,
              int bo, int bi, int n0, int n1);

// ---------------------------------------------------------------- ops (one file each)
void int4_matmul(float* out, const float* x, const int32_t* packed, const void* scales,
                 bool scales_f32, int T, int I, int N, int group);
void bf16_matmul(float* out, const float* x, const uint16_t* w, int T, int I, int N);
// w in formats.TiledBF16's layout: data[ceil(N/16)][ceil(I/32)][16][32] bf16 bits (bf16_tiled.cpp)
void bf16_tiled_matmul(float* out, const float* x, const uint16_t* data, int T, int I, int N);
void fp8_matmul(float* out, const float* x, const uint8_t* w, const float* scale_inv, int T, int I,
                int N, int bo, int bi);

// One expert's three matrices: for INT4 q = packed int32 and s = scales; for BF16 q = bits,
// s = null; for FP8 q = e4m3 codes, s = float32 scale_inv, block = (bo, bi).
enum MoeFormat { MOE_BF16 = 0, MOE_INT4 = 1, MOE_FP8 = 2 };
struct ExpertMats {
    const void* q[3];   // gate, up, down
    const void* s[3];
    bool s_f32[3];
    int block[3][2];    // FP8 only
};
void moe(float* out, const float* x, const int32_t* lidx, const float* weights,
         const ExpertMats* experts, int n_used, int fmt, int group, int T, int D, int F, int K);

// Latent cache element types (kvcache.py, ref.mla_decode). An int8 row of W = C+R values is
// kv8_row_bytes(W) bytes: the codes round(x / s) (|code| <= 127; latent and rope key each with
// its own absmax scale), then at byte kv8_meta(W) float s_latent, float s_rope, int32 Σ latent
// codes, int32 Σ rope codes (the sums let the query be unsigned in the VNNI dot products).
enum KvDtype { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2 };
static inline int kv8_meta(int W) { return (W + 3) / 4 * 4; }
static inline int kv8_row_bytes(int W) { return kv8_meta(W) + 16; }
// pool: [pages][page][row] of float32, bf16 bits or int8 rows (kind). float32 rows and exact
// mode run fp32 FMAs; bf16 and int8 rows run vdpbf16ps / vpdpbusd where built (mla_decode.cpp).
void mla_decode(float* out, const float* q_latent, const float* q_pe, const void* pool, int kind,
                const int32_t* page_table, const int32_t* lengths, int B, int H, int C, int R,
                int page, int max_pages, float scale);
// q_latent[B,H,C] = q_nope[B,H,N] folded through W_UK; o[B,H,V] = u[B,H,C] through W_UV;
// kv_b is kv_b_proj as bf16 bits [H*(N+V), C] (mla_decode.cpp).
void mla_absorb_q(float* out, const float* q_nope, const uint16_t* kv_b, int B, int H, int N, int V, int C);
void mla_absorb_o(float* out, const float* u, const uint16_t* kv_b, int B, int H, int N, int V, int C);
// Keys and values of attention(), read in place: key i < N of token s, head h at
// kn[s*kn_tok + h*kn_head + i], key N + r (shared by the heads) at kr[s*kr_tok + r], value c at
// v[s*v_tok + h*v_head + c]. q is [T, H, N+R].
struct AttnKV {
    const float* kn; size_t kn_tok, kn_head; int N;
    const float* kr; size_t kr_tok; int R;
    const float* v; size_t v_tok, v_head;
};
// lse [T, H] (or null): each query's log-sum-exp; merge: out and lse hold an earlier block's
// result, combined with this one (attention.cpp).
void attention(float* out, float* lse, bool merge, const float* q, const AttnKV& kv, int T, int S, int H, int Dv,
               float scale, int q_offset);
void rmsnorm(float* out, const float* x, const float* w, int T, int D, float eps);
void rope(float* out, const float* x, const int64_t* positions, const float* inv_freq,
          int T, int H, int R);
double stream_read(const float* x, int64_t n);   // benchmark helper: parallel sum
