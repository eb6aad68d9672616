// pybind11 glue for k2lite._cuda: argument checks and pointer extraction only.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace py = pybind11;

int k2_cuda_device_count();
std::string k2_cuda_device_name(int device);

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "k2lite CUDA kernels (device discovery; kernels follow k2lite/ref.py contracts)";
    m.def("device_count", &k2_cuda_device_count, "number of CUDA devices (0 without driver or GPU)");
    m.def("device_name", [](int device) {
        if (device < 0 || device >= k2_cuda_device_count())
            throw py::value_error("device index out of range");
        return k2_cuda_device_name(device);
    });
}
