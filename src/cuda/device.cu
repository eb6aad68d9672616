// Device discovery for k2lite._cuda. The GPU kernels (issue 7) build on this module; until
// they land it only reports which GPUs are present, so the build path is exercised
// wherever nvcc exists and k2lite can tell "built without a GPU" from "not built".
#include <cuda_runtime.h>

#include <string>

int k2_cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver / no device" error
        return 0;
    }
    return n;
}

std::string k2_cuda_device_name(int device) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "";
    return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}
