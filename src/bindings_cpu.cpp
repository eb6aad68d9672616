// pybind11 glue for k2lite._cpu: checks arguments, extracts pointers, calls src/cpu; no math.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "k2lite CPU kernels (see k2lite/ref.py for the contract of each op)";
}
