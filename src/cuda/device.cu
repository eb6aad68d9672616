// Device discovery for k2lite._cuda: how many GPUs there are and their names, so k2lite can
// tell "built, but no GPU here" from "not built". The kernels live in files named by op
// (matmul.cu: bf16_matmul and int4_matmul, with the device buffers they read).
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
