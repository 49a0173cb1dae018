// Fused fast Walsh-Hadamard transform kernel and its C launchers; see hadamard_kernel.h for the contract and
// for what is (and is not) verified on a machine without a GPU.
//
// Built with nvcc this file holds the CUDA kernel, qvggt_hadamard_launch and the host twin. Built as plain
// C++ (g++ -x c++) it holds only the host twin: the device code is behind __CUDACC__, the per-row algorithm
// is shared through hadamard_kernel.h.
#include "hadamard_kernel.h"

#include <cmath>
#include <vector>

#ifdef __CUDACC__
#include <cuda_runtime.h>

namespace qvggt {

// One block per row: load (pre-scale, H_m) -> log2(d / m) shared-memory butterfly stages -> store
// (1/sqrt(d), post-scale). Shared memory: d floats (dynamic). Rows are independent, so a grid of `rows` blocks
// needs no inter-block synchronisation; x == y is safe because a block reads its whole row before any write.
template <typename T>
__global__ void hadamard_rows_kernel(const T* x, T* y, int d, int m, const signed char* __restrict__ hm,
                                     const float* __restrict__ pre, const float* __restrict__ post, float scale) {
    extern __shared__ float buf[];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    hadamard_load(buf, x + row * d, d, m, hm, pre, tid, nthreads);
    __syncthreads();
    for (int h = 1; h < d / m; h <<= 1) {
        hadamard_butterfly(buf, d, m, h, tid, nthreads);
        __syncthreads();
    }
    hadamard_store(y + row * d, buf, d, post, scale, tid, nthreads);
}

template <typename T>
static int launch_typed(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                        const float* pre, const float* post, cudaStream_t stream) {
    const int threads = hadamard_threads(d);
    const size_t shared = static_cast<size_t>(d) * sizeof(float);
    const float scale = 1.0f / sqrtf(static_cast<float>(d));
    const long long max_grid = 2147483647LL;  // gridDim.x limit
    for (long long start = 0; start < rows; start += max_grid) {
        const long long n = rows - start < max_grid ? rows - start : max_grid;
        hadamard_rows_kernel<T><<<static_cast<unsigned int>(n), threads, shared, stream>>>(
            static_cast<const T*>(x) + start * d, static_cast<T*>(y) + start * d, d, m, hm, pre, post, scale);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    return QVGGT_HADAMARD_OK;
}

}  // namespace qvggt

extern "C" int qvggt_hadamard_launch(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                                     const float* pre, const float* post, int dtype, void* stream) {
    const int status = qvggt::hadamard_check(d, m, hm);
    if (status != QVGGT_HADAMARD_OK) return status;
    if (rows <= 0) return QVGGT_HADAMARD_OK;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case QVGGT_HADAMARD_FP32: return qvggt::launch_typed<float>(x, y, rows, d, m, hm, pre, post, s);
        case QVGGT_HADAMARD_FP16: return qvggt::launch_typed<__half>(x, y, rows, d, m, hm, pre, post, s);
        case QVGGT_HADAMARD_BF16: return qvggt::launch_typed<__nv_bfloat16>(x, y, rows, d, m, hm, pre, post, s);
        default: return QVGGT_HADAMARD_BAD_DTYPE;
    }
}
#endif  // __CUDACC__

// Host twin: the kernel's schedule with the block's threads run one after another. Each phase of the kernel
// (load, every butterfly stage, store) ends at a __syncthreads(), and within a phase no two threads touch the
// same element, so running the threads of a phase in any order gives the kernel's result.
extern "C" int qvggt_hadamard_rows_host(const float* x, float* y, long long rows, int d, int m,
                                        const signed char* hm, const float* pre, const float* post, int nthreads) {
    const int status = qvggt::hadamard_check(d, m, hm);
    if (status != QVGGT_HADAMARD_OK) return status;
    if (nthreads <= 0) nthreads = qvggt::hadamard_threads(d);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> buf(static_cast<size_t>(d));
    for (long long row = 0; row < rows; ++row) {
        for (int tid = 0; tid < nthreads; ++tid) qvggt::hadamard_load(buf.data(), x + row * d, d, m, hm, pre, tid, nthreads);
        for (int h = 1; h < d / m; h <<= 1) {
            for (int tid = 0; tid < nthreads; ++tid) qvggt::hadamard_butterfly(buf.data(), d, m, h, tid, nthreads);
        }
        for (int tid = 0; tid < nthreads; ++tid) qvggt::hadamard_store(y + row * d, buf.data(), d, post, scale, tid, nthreads);
    }
    return QVGGT_HADAMARD_OK;
}
