// pybind11 glue for k2lite.backends._cpu_<level>: checks arguments, extracts pointers, calls src/cpu; no math.
// k2lite/cpu.py validates with friendly messages first; these checks (dtype, C order, shapes,
// index ranges) make a direct call just as safe. Arrays may be read-only (mmap'd weights):
// only `out` is written. Each op releases the GIL while it runs.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <string>
#include <vector>
#include "common.h"

namespace py = pybind11;
using arr = py::array;

static void need(bool ok, const char* msg) {
    if (!ok) throw py::value_error(msg);
}
[[noreturn]] static void fail(const char* name, const std::string& what) {
    throw py::value_error(std::string(name) + ": " + what);
}

// Pointer to a C-contiguous array of dtype T with the given shape (-1: any extent). Messages
// are only built on failure: this runs several times per op call (~0.1 us, not ~3 us).
template <class T>
static const T* cptr(const arr& a, const char* name, std::initializer_list<py::ssize_t> shape) {
    if (!a.dtype().is(py::dtype::of<T>())) fail(name, "wrong dtype " + std::string(py::str(a.dtype())));
    if (!(a.flags() & arr::c_style)) fail(name, "must be C-contiguous");
    if (a.ndim() != (py::ssize_t)shape.size()) fail(name, "wrong number of dimensions");
    py::ssize_t i = 0;
    for (py::ssize_t e : shape) {
        if (e >= 0 && a.shape(i) != e) fail(name, "wrong shape");
        i++;
    }
    return static_cast<const T*>(a.data());
}
template <class T>
static T* wptr(arr& a, const char* name, std::initializer_list<py::ssize_t> shape) {
    cptr<T>(a, name, shape);
    if (!a.writeable()) fail(name, "must be writeable");
    return static_cast<T*>(a.mutable_data());
}
static const void* scale_ptr(const arr& s, const char* name, int N, int ng, bool& f32) {
    f32 = s.dtype().is(py::dtype::of<float>());
    if (f32) return cptr<float>(s, name, {N, ng});
    return cptr<uint16_t>(s, name, {N, ng});
}

static void b_int4_matmul(arr out, arr x, arr packed, arr scales, int group) {
    need(group > 0, "group_size must be positive");
    const int T = x.shape(0), I = x.ndim() == 2 ? x.shape(1) : -1, N = packed.shape(0);
    const float* xp = cptr<float>(x, "x", {-1, -1});
    const int32_t* pp = cptr<int32_t>(packed, "packed", {N, ceil_div(I, 8)});
    bool f32;
    const void* sp = scale_ptr(scales, "scales", N, ceil_div(I, group), f32);
    float* op = wptr<float>(out, "out", {T, N});
    py::gil_scoped_release nogil;
    int4_matmul(op, xp, pp, sp, f32, T, I, N, group);
}

static void b_bf16_matmul(arr out, arr x, arr w) {
    const int T = x.shape(0), I = x.ndim() == 2 ? x.shape(1) : -1, N = w.shape(0);
    const float* xp = cptr<float>(x, "x", {-1, -1});
    const uint16_t* wp = cptr<uint16_t>(w, "w", {N, I});
    float* op = wptr<float>(out, "out", {T, N});
    py::gil_scoped_release nogil;
    bf16_matmul(op, xp, wp, T, I, N);
}

static void b_bf16_tiled_matmul(arr out, arr x, arr data, int N) {
    const int T = x.shape(0), I = x.ndim() == 2 ? x.shape(1) : -1;
    const float* xp = cptr<float>(x, "x", {-1, -1});
    need(N >= 0, "N must be >= 0");
    const uint16_t* dp = cptr<uint16_t>(data, "data", {ceil_div(N, 16), ceil_div(I, 32), 16, 32});
    float* op = wptr<float>(out, "out", {T, N});
    py::gil_scoped_release nogil;
    bf16_tiled_matmul(op, xp, dp, T, I, N);
}

static void b_fp8_matmul(arr out, arr x, arr w, arr scale_inv, int bo, int bi) {
    need(bo > 0 && bi > 0, "block sizes must be positive");
    const int T = x.shape(0), I = x.ndim() == 2 ? x.shape(1) : -1, N = w.shape(0);
    const float* xp = cptr<float>(x, "x", {-1, -1});
    const uint8_t* wp = cptr<uint8_t>(w, "weight", {N, I});
    const float* sp = cptr<float>(scale_inv, "scale_inv", {ceil_div(N, bo), ceil_div(I, bi)});
    float* op = wptr<float>(out, "out", {T, N});
    py::gil_scoped_release nogil;
    fp8_matmul(op, xp, wp, sp, T, I, N, bo, bi);
}

// experts: list of (gate, up, down) for the used experts only; each matrix is a bf16 array
// (fmt 0), a (packed, scales) pair (fmt 1, INT4) or a (weight, scale_inv, bo, bi) tuple
// (fmt 2, FP8). lidx[T,K] holds positions in that list.
static void b_moe(arr out, arr x, py::list experts, arr lidx, arr weights, int fmt, int group) {
    need(fmt >= MOE_BF16 && fmt <= MOE_FP8, "moe: unknown expert format");
    const bool int4 = fmt == MOE_INT4;
    const float* xp = cptr<float>(x, "x", {-1, -1});
    const int T = x.shape(0), D = x.shape(1);
    const int32_t* ip = cptr<int32_t>(lidx, "idx", {T, -1});
    const int K = lidx.shape(1);
    const float* wp = cptr<float>(weights, "weights", {T, K});
    float* op = wptr<float>(out, "out", {T, D});
    const int U = (int)experts.size();
    for (int i = 0; i < T * K; i++) need(ip[i] >= 0 && ip[i] < U, "idx: expert id out of range");
    need(!int4 || group > 0, "group_size must be positive");
    std::vector<ExpertMats> mats(U);
    int F = -1;
    for (int u = 0; u < U; u++) {
        py::tuple e = experts[u].cast<py::tuple>();
        need(e.size() == 3, "each expert must be (gate, up, down)");
        for (int m = 0; m < 3; m++) {
            // gate/up: [F, D]; down: [D, F]
            if (int4) {
                py::tuple ps = e[m].cast<py::tuple>();
                need(ps.size() == 2, "int4 matrix must be (packed, scales)");
                arr pk = ps[0].cast<arr>(), sc = ps[1].cast<arr>();
                if (F < 0) F = pk.shape(0);
                const int rows = m < 2 ? F : D, cols = m < 2 ? D : F;
                mats[u].q[m] = cptr<int32_t>(pk, "packed", {rows, ceil_div(cols, 8)});
                mats[u].s[m] = scale_ptr(sc, "scales", rows, ceil_div(cols, group), mats[u].s_f32[m]);
                need(mats[u].s_f32[m] == mats[0].s_f32[0], "experts: all scales must share one dtype");
            } else if (fmt == MOE_FP8) {
                py::tuple ws = e[m].cast<py::tuple>();
                need(ws.size() == 4, "fp8 matrix must be (weight, scale_inv, bo, bi)");
                arr w = ws[0].cast<arr>(), sc = ws[1].cast<arr>();
                const int bo = ws[2].cast<int>(), bi = ws[3].cast<int>();
                need(bo > 0 && bi > 0, "fp8 block sizes must be positive");
                if (F < 0) F = w.shape(0);
                const int rows = m < 2 ? F : D, cols = m < 2 ? D : F;
                mats[u].q[m] = cptr<uint8_t>(w, "weight", {rows, cols});
                mats[u].s[m] = cptr<float>(sc, "scale_inv", {ceil_div(rows, bo), ceil_div(cols, bi)});
                mats[u].s_f32[m] = true;
                mats[u].block[m][0] = bo;
                mats[u].block[m][1] = bi;
            } else {
                arr w = e[m].cast<arr>();
                if (F < 0) F = w.shape(0);
                const int rows = m < 2 ? F : D, cols = m < 2 ? D : F;
                mats[u].q[m] = cptr<uint16_t>(w, "w", {rows, cols});
                mats[u].s[m] = nullptr;
                mats[u].s_f32[m] = false;
            }
        }
    }
    if (U == 0 || T == 0) {
        for (int i = 0; i < T * D; i++) op[i] = 0.f;
        return;
    }
    py::gil_scoped_release nogil;
    moe(op, xp, ip, wp, mats.data(), U, fmt, group, T, D, F, K);
}

static void b_mla_decode(arr out, arr q_latent, arr q_pe, arr pool, arr page_table, arr lengths, float scale) {
    const float* ql = cptr<float>(q_latent, "q_latent", {-1, -1, -1});
    const int B = q_latent.shape(0), H = q_latent.shape(1), C = q_latent.shape(2);
    const float* qr = cptr<float>(q_pe, "q_pe", {B, H, -1});
    const int R = q_pe.shape(2);
    const int kind = pool.dtype().is(py::dtype::of<uint16_t>()) ? KV_BF16
                     : pool.dtype().is(py::dtype::of<int8_t>()) ? KV_INT8 : KV_F32;
    const void* pp = kind == KV_BF16 ? (const void*)cptr<uint16_t>(pool, "pool", {-1, -1, C + R})
                     : kind == KV_INT8 ? (const void*)cptr<int8_t>(pool, "pool", {-1, -1, kv8_row_bytes(C + R)})
                                       : (const void*)cptr<float>(pool, "pool", {-1, -1, C + R});
    const int P = pool.shape(0), page = pool.shape(1);
    const int32_t* pt = cptr<int32_t>(page_table, "page_table", {B, -1});
    const int maxp = page_table.shape(1);
    const int32_t* ln = cptr<int32_t>(lengths, "lengths", {B});
    float* op = wptr<float>(out, "out", {B, H, C});
    need(page > 0, "pool: page size must be positive");
    for (int b = 0; b < B; b++) {
        need(ln[b] >= 0 && (int64_t)ln[b] <= (int64_t)maxp * page, "lengths: out of range");
        for (int j = 0; j < ceil_div(ln[b], page); j++)
            need(pt[(size_t)b * maxp + j] >= 0 && pt[(size_t)b * maxp + j] < P, "page_table: page id out of range");
    }
    py::gil_scoped_release nogil;
    mla_decode(op, ql, qr, pp, kind, pt, ln, B, H, C, R, page, maxp, scale);
}

static void b_mla_absorb_q(arr out, arr q_nope, arr kv_b) {
    const float* qp = cptr<float>(q_nope, "q_nope", {-1, -1, -1});
    const int B = q_nope.shape(0), H = q_nope.shape(1), N = q_nope.shape(2);
    const uint16_t* wp = cptr<uint16_t>(kv_b, "kv_b", {-1, -1});
    const int rows = kv_b.shape(0), C = kv_b.shape(1);
    need(H > 0 && rows % H == 0 && rows / H > N, "kv_b: rows must be H*(N+V) with V > 0");
    float* op = wptr<float>(out, "out", {B, H, C});
    py::gil_scoped_release nogil;
    mla_absorb_q(op, qp, wp, B, H, N, rows / H - N, C);
}

static void b_mla_absorb_o(arr out, arr u, arr kv_b, int N) {
    const float* up = cptr<float>(u, "u", {-1, -1, -1});
    const int B = u.shape(0), H = u.shape(1), C = u.shape(2);
    const uint16_t* wp = cptr<uint16_t>(kv_b, "kv_b", {-1, C});
    const int rows = kv_b.shape(0);
    need(H > 0 && N >= 0 && rows % H == 0 && rows / H > N, "kv_b: rows must be H*(N+V) with V > 0");
    const int V = rows / H - N;
    float* op = wptr<float>(out, "out", {B, H, V});
    py::gil_scoped_release nogil;
    mla_absorb_o(op, up, wp, B, H, N, V, C);
}

// q [T, H, Dk], k [S, H, Dk], v [S, H, Dv] -> out [T, H, Dv]; with lse [T, H] (attention_lse), each
// query's log-sum-exp too, and merge = true combines this block of keys with what out and lse hold.
static void run_attention(arr out, arr* lse, bool merge, arr q, arr k, arr v, float scale, int q_offset) {
    const float* qp = cptr<float>(q, "q", {-1, -1, -1});
    const int T = q.shape(0), H = q.shape(1), Dk = q.shape(2);
    const float* kp = cptr<float>(k, "k", {-1, H, Dk});
    const int S = k.shape(0);
    const float* vp = cptr<float>(v, "v", {S, H, -1});
    const int Dv = v.shape(2);
    float* op = wptr<float>(out, "out", {T, H, Dv});
    float* lp = lse ? wptr<float>(*lse, "lse", {T, H}) : nullptr;
    need(q_offset >= 0, "q_offset must be >= 0");
    const AttnKV kv{kp, (size_t)H * Dk, (size_t)Dk, Dk, nullptr, 0, 0, vp, (size_t)H * Dv, (size_t)Dv};
    py::gil_scoped_release nogil;
    attention(op, lp, merge, qp, kv, T, S, H, Dv, scale, q_offset);
}

static void b_attention(arr out, arr q, arr k, arr v, float scale, int q_offset) {
    run_attention(out, nullptr, false, q, k, v, scale, q_offset);
}

static void b_attention_lse(arr out, arr lse, bool merge, arr q, arr k, arr v, float scale, int q_offset) {
    run_attention(out, &lse, merge, q, k, v, scale, q_offset);
}

// MLA's expanded form: q [T, H, N+R], kv = kv_b's output [S, H, N+V] (keys' nope part, then the
// values), k_pe [S, R] (shared by the heads); out [T, H, V] and lse [T, H] as attention_lse.
static void b_mla_attention_lse(arr out, arr lse, bool merge, arr q, arr kv, arr k_pe, int N, float scale,
                                int q_offset) {
    const float* qp = cptr<float>(q, "q", {-1, -1, -1});
    const int T = q.shape(0), H = q.shape(1), Dk = q.shape(2);
    need(N >= 0 && N <= Dk, "N: out of range");
    const int R = Dk - N;
    const float* kvp = cptr<float>(kv, "kv", {-1, H, -1});
    const int S = kv.shape(0), V = kv.shape(2) - N;
    need(V >= 0, "kv: fewer than N columns per head");
    const float* kr = cptr<float>(k_pe, "k_pe", {S, R});
    float* op = wptr<float>(out, "out", {T, H, V});
    float* lp = wptr<float>(lse, "lse", {T, H});
    need(q_offset >= 0, "q_offset must be >= 0");
    const size_t row = (size_t)H * (N + V);
    const AttnKV a{kvp, row, (size_t)(N + V), N, kr, (size_t)R, R, kvp + N, row, (size_t)(N + V)};
    py::gil_scoped_release nogil;
    attention(op, lp, merge, qp, a, T, S, H, V, scale, q_offset);
}

static void b_rmsnorm(arr out, arr x, arr w, float eps) {
    const float* xp = cptr<float>(x, "x", {-1, -1});
    const int T = x.shape(0), D = x.shape(1);
    const float* wp = cptr<float>(w, "w", {D});
    float* op = wptr<float>(out, "out", {T, D});
    py::gil_scoped_release nogil;
    rmsnorm(op, xp, wp, T, D, eps);
}

static void b_rope(arr out, arr x, arr positions, arr inv_freq) {
    const float* xp = cptr<float>(x, "x", {-1, -1, -1});
    const int T = x.shape(0), H = x.shape(1), R = x.shape(2);
    need(R % 2 == 0, "x: rope dim must be even");
    const int64_t* pp = cptr<int64_t>(positions, "positions", {T});
    const float* fp = cptr<float>(inv_freq, "inv_freq", {R / 2});
    float* op = wptr<float>(out, "out", {T, H, R});
    py::gil_scoped_release nogil;
    rope(op, xp, pp, fp, T, H, R);
}

static double b_stream_read(arr x) {
    const float* p = cptr<float>(x, "x", {-1});
    const int64_t n = x.shape(0);
    py::gil_scoped_release nogil;
    return stream_read(p, n);
}

static void b_set_threads(int n) {
    need(n > 0, "threads must be positive");
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

static int b_get_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void b_set_exact(bool on) { g_exact = on; }
static bool b_get_exact() { return g_exact; }

// setup.py builds these sources once per SIMD level, as k2lite.backends._cpu_avx512 / _cpu_avx2 /
// _cpu_scalar; k2lite/_cpu.py imports the best one this machine runs.
#ifndef K2LITE_CPU_MODULE
#define K2LITE_CPU_MODULE _cpu
#endif

PYBIND11_MODULE(K2LITE_CPU_MODULE, m) {
    m.doc() = "k2lite CPU kernels (see k2lite/ref.py for the contract of each op)";
    m.def("int4_matmul", &b_int4_matmul);
    m.def("bf16_matmul", &b_bf16_matmul);
    m.def("bf16_tiled_matmul", &b_bf16_tiled_matmul);
    m.def("fp8_matmul", &b_fp8_matmul);
    m.def("moe", &b_moe);
    m.def("mla_decode", &b_mla_decode);
    m.def("mla_absorb_q", &b_mla_absorb_q);
    m.def("mla_absorb_o", &b_mla_absorb_o);
    m.def("attention", &b_attention);
    m.def("attention_lse", &b_attention_lse);
    m.def("mla_attention_lse", &b_mla_attention_lse);
    m.def("rmsnorm", &b_rmsnorm);
    m.def("rope", &b_rope);
    m.def("stream_read", &b_stream_read);
    m.def("set_threads", &b_set_threads);
    m.def("get_threads", &b_get_threads);
    m.def("set_exact", &b_set_exact);
    m.def("get_exact", &b_get_exact);
    m.attr("int4_vnni") = int4_vnni(128, 32, false);
#ifdef K2_BF16DP
    m.attr("bf16_dp") = true;     // BF16 matmuls on vdpbf16ps, batch-invariant (common.h)
#else
    m.attr("bf16_dp") = false;
#endif
#if defined(K2_AVX512)
    m.attr("simd") = "avx512";
#elif defined(__AVX2__)
    m.attr("simd") = "avx2";
#else
    m.attr("simd") = "scalar";
#endif
}
