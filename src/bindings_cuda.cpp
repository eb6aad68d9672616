// pybind11 glue for k2lite.backends._cuda: argument checks and pointer extraction only; the CUDA calls
// live in src/cuda/*.cu. Weights live on the device in DeviceBuffers (upload once, freed when
// the Python object dies); the matmuls take host x / out and device weights, check every
// shape here (ValueError naming the argument) and release the GIL while they run. CUDA
// failures arrive as std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using arr = py::array;

int k2_cuda_device_count();
std::string k2_cuda_device_name(int device);
void* k2_cuda_upload(const void* host, size_t nbytes);
void k2_cuda_free(void* p) noexcept;
void k2_cuda_bf16_matmul(float* y, const float* x, const void* w, int T, int I, int N);
void k2_cuda_int4_matmul(float* y, const float* x, const void* packed, const void* scales, bool scales_f32, int T,
                         int I, int N, int group);

namespace {

// A device copy of a C-contiguous host array; owns its memory (not copyable).
struct DeviceBuffer {
    void* ptr = nullptr;
    size_t nbytes = 0;
    std::string dtype;
    std::vector<py::ssize_t> shape;

    DeviceBuffer() = default;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    ~DeviceBuffer() { k2_cuda_free(ptr); }
};

[[noreturn]] void fail(const char* name, const std::string& what) {
    throw py::value_error(std::string(name) + ": " + what);
}

std::string shape_str(const std::vector<py::ssize_t>& s) {
    std::string r = "(";
    for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + (s.size() == 1 ? ",)" : ")");
}

int as_int(py::ssize_t v, const char* name) {
    if (v < 0 || v > INT32_MAX) fail(name, "size " + std::to_string(v) + " out of range");
    return static_cast<int>(v);
}

// Host array of dtype T, C-contiguous, 2-D [rows, cols] (-1: any), writeable if asked.
template <class T>
T* host_ptr(arr& a, const char* name, py::ssize_t rows, py::ssize_t cols, bool write) {
    if (!a.dtype().is(py::dtype::of<T>())) fail(name, "wrong dtype " + std::string(py::str(a.dtype())));
    if (!(a.flags() & arr::c_style)) fail(name, "must be C-contiguous");
    if (a.ndim() != 2) fail(name, "expected 2 dims, got " + std::to_string(a.ndim()));
    if ((rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols))
        fail(name, "wrong shape " + shape_str({a.shape(0), a.shape(1)}));
    if (write && !a.writeable()) fail(name, "must be writeable");
    return static_cast<T*>(write ? a.mutable_data() : const_cast<void*>(a.data()));
}

void dev_check(const DeviceBuffer& b, const char* name, const char* dtype, py::ssize_t rows, py::ssize_t cols) {
    if (b.dtype != dtype) fail(name, std::string("expected a ") + dtype + " buffer, got " + b.dtype);
    if (b.shape != std::vector<py::ssize_t>{rows, cols})
        fail(name, "expected shape " + shape_str({rows, cols}) + ", got " + shape_str(b.shape));
}

py::ssize_t cdiv(py::ssize_t a, py::ssize_t b) { return (a + b - 1) / b; }

std::unique_ptr<DeviceBuffer> upload(py::array a) {
    static const char* ok[] = {"uint16", "int32", "float32", "uint8", "int8"};
    const std::string dt = py::str(a.dtype());
    bool known = false;
    for (const char* d : ok) known |= dt == d;
    if (!known) fail("array", "unsupported dtype " + dt);
    // a C-contiguous view of a (copied only when a is not already C-contiguous)
    arr c = arr::ensure(a, arr::c_style);
    if (!c) throw py::error_already_set();
    auto b = std::make_unique<DeviceBuffer>();
    b->nbytes = static_cast<size_t>(c.nbytes());
    b->dtype = dt;
    b->shape.assign(c.shape(), c.shape() + c.ndim());
    const void* host = c.data();
    {
        py::gil_scoped_release nogil;
        b->ptr = k2_cuda_upload(host, b->nbytes);
    }
    return b;
}

void bf16_matmul(arr out, arr x, const DeviceBuffer& w, py::ssize_t N, py::ssize_t I) {
    const int n = as_int(N, "N"), i = as_int(I, "I");
    const float* xp = host_ptr<float>(x, "x", -1, I, false);
    const int t = as_int(x.shape(0), "x");
    float* op = host_ptr<float>(out, "out", t, N, true);
    dev_check(w, "w", "uint16", N, I);
    py::gil_scoped_release nogil;
    k2_cuda_bf16_matmul(op, xp, w.ptr, t, i, n);
}

void int4_matmul(arr out, arr x, const DeviceBuffer& packed, const DeviceBuffer& scales, py::ssize_t N,
                 py::ssize_t I, int group, bool scales_f32) {
    if (group <= 0) throw py::value_error("group_size must be positive, got " + std::to_string(group));
    const int n = as_int(N, "N"), i = as_int(I, "I");
    const float* xp = host_ptr<float>(x, "x", -1, I, false);
    const int t = as_int(x.shape(0), "x");
    float* op = host_ptr<float>(out, "out", t, N, true);
    dev_check(packed, "packed", "int32", N, cdiv(I, 8));
    dev_check(scales, "scales", scales_f32 ? "float32" : "uint16", N, cdiv(I, group));
    py::gil_scoped_release nogil;
    k2_cuda_int4_matmul(op, xp, packed.ptr, scales.ptr, scales_f32, t, i, n, group);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "k2lite CUDA kernels: device discovery, device buffers, bf16 / INT4 matmuls (k2lite/ref.py contracts)";
    m.def("device_count", &k2_cuda_device_count, "number of CUDA devices (0 without driver or GPU)");
    m.def("device_name", [](int device) {
        if (device < 0 || device >= k2_cuda_device_count())
            throw py::value_error("device index out of range");
        return k2_cuda_device_name(device);
    });

    py::class_<DeviceBuffer>(m, "DeviceBuffer", "a device copy of a host array; freed when this object dies")
        .def_readonly("nbytes", &DeviceBuffer::nbytes)
        .def_readonly("dtype", &DeviceBuffer::dtype)
        .def_property_readonly("shape", [](const DeviceBuffer& b) {
            py::tuple t(b.shape.size());
            for (size_t i = 0; i < b.shape.size(); i++) t[i] = b.shape[i];
            return t;
        })
        .def("__repr__", [](const DeviceBuffer& b) {
            return "<DeviceBuffer " + b.dtype + " " + shape_str(b.shape) + ", " + std::to_string(b.nbytes) + " bytes>";
        });

    m.def("upload", &upload, py::arg("array"),
          "copy a host array (uint16, int32, float32, uint8, int8) to the device once -> DeviceBuffer");
    m.def("bf16_matmul", &bf16_matmul, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("N"), py::arg("I"),
          "out[T,N] = x[T,I] · w[N,I]ᵀ; w: uint16 (bf16 bits) DeviceBuffer; x, out: host float32");
    m.def("int4_matmul", &int4_matmul, py::arg("out"), py::arg("x"), py::arg("packed"), py::arg("scales"),
          py::arg("N"), py::arg("I"), py::arg("group"), py::arg("scales_f32"),
          "out[T,N] = x[T,I] · W[N,I]ᵀ, W from int32 packed [N, ceil(I/8)] and bf16 (uint16) or float32 "
          "scales [N, ceil(I/group)] DeviceBuffers; x, out: host float32");
}
