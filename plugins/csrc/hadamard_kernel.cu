// Fused fast Walsh-Hadamard transform kernels and their C launchers; see hadamard_kernel.h for the contract, the
// two schedules and the three ways this file is compiled.
//
//   nvcc:          the kernels, qvggt_hadamard_launch(_schedule) and the host twins.
//   NVRTC:         the kernels only (extern "C" names, so the runtime loader finds them without name mangling):
//                  qvggt_hadamard_{simple,tiled}_{f32,f16,bf16}. Used by qvggt_export.plugins.hadamard_cuda.
//   g++ -x c++:    the host twins only (the device code is behind __CUDACC__).
#include "hadamard_kernel.h"

#ifndef __CUDACC_RTC__
#include <cmath>
#include <vector>
#endif

#ifdef __CUDACC__
namespace qvggt {

// Simple schedule. One block per row: load (pre-scale, H_m) -> log2(d / m) shared-memory butterfly stages ->
// store (1/sqrt(d), post-scale). Shared memory: d floats (dynamic). x == y is safe: a block reads its whole row
// before any write.
template <typename T>
__device__ __forceinline__ void simple_row(const T* x, T* y, int d, int m, const signed char* __restrict__ hm,
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

// Round 0 of the tiled schedule with one or two 16-byte loads per thread (rows are 16-byte aligned: d is a
// multiple of 256 and the buffers come from cudaMalloc / TensorRT, both >= 256-byte aligned).
__device__ __forceinline__ void load8(float* v, const float* x) {
    const float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8(float* v, const T* x) {  // two-byte storage types
    const uint4 u = *reinterpret_cast<const uint4*>(x);
    const unsigned int words[4] = {u.x, u.y, u.z, u.w};
    QVGGT_UNROLL
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = to_float(T{static_cast<unsigned short>(words[i] & 0xffffu)});
        v[2 * i + 1] = to_float(T{static_cast<unsigned short>(words[i] >> 16)});
    }
}

// Tiled schedule (m == 1, d = 2^log_d >= 256), blockDim.x = d / 8; shared memory: tiled_shared_floats(d).
template <typename T>
__device__ __forceinline__ void tiled_row(const T* x, T* y, int log_d, const float* __restrict__ pre,
                                          const float* __restrict__ post, float scale) {
    extern __shared__ float buf[];
    const long long row = blockIdx.x;
    const int d = 1 << log_d, t = threadIdx.x;
    float v[QVGGT_HADAMARD_TILE];
    load8(v, x + row * d + t * QVGGT_HADAMARD_TILE);
    if (pre) {
        QVGGT_UNROLL
        for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) v[k] *= pre[t * QVGGT_HADAMARD_TILE + k];
    }
    tiled_butterfly(v, 0);
    int done = 3, b = 0;
    while (done < log_d) {
        tiled_to_shared(buf, v, b, t);
        __syncthreads();
        const int next = tiled_next_window(done, log_d);
        tiled_from_shared(v, buf, next, t);
        __syncthreads();  // every thread has read before the next round writes
        tiled_butterfly(v, done - next);
        b = next;
        done = next + 3;
    }
    tiled_store_row(y + row * d, v, b, post, scale, t);
}

}  // namespace qvggt

#define QVGGT_HADAMARD_ENTRIES(SUFFIX, T)                                                                            \
    extern "C" __global__ void qvggt_hadamard_simple_##SUFFIX(const T* x, T* y, int d, int m, const signed char* hm, \
                                                              const float* pre, const float* post, float scale) {     \
        qvggt::simple_row<T>(x, y, d, m, hm, pre, post, scale);                                                      \
    }                                                                                                                \
    extern "C" __global__ void qvggt_hadamard_tiled_##SUFFIX(const T* x, T* y, int log_d, const float* pre,          \
                                                             const float* post, float scale) {                       \
        qvggt::tiled_row<T>(x, y, log_d, pre, post, scale);                                                          \
    }

QVGGT_HADAMARD_ENTRIES(f32, float)
QVGGT_HADAMARD_ENTRIES(f16, qvggt::half_bits)
QVGGT_HADAMARD_ENTRIES(bf16, qvggt::bf16_bits)

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

namespace qvggt {

template <typename T>
static int launch_typed(void (*simple)(const T*, T*, int, int, const signed char*, const float*, const float*, float),
                        void (*tiled)(const T*, T*, int, const float*, const float*, float), const void* x, void* y,
                        long long rows, int d, int m, const signed char* hm, const float* pre, const float* post,
                        int schedule, cudaStream_t stream) {
    const int floats = schedule == QVGGT_HADAMARD_TILED ? tiled_shared_floats(d) : d;
    const size_t shared = static_cast<size_t>(floats) * sizeof(float);
    const float scale = 1.0f / sqrtf(static_cast<float>(d));
    const long long max_grid = 2147483647LL;  // gridDim.x limit
    for (long long start = 0; start < rows; start += max_grid) {
        const long long n = rows - start < max_grid ? rows - start : max_grid;
        const T* xs = static_cast<const T*>(x) + start * d;
        T* ys = static_cast<T*>(y) + start * d;
        if (schedule == QVGGT_HADAMARD_TILED) {
            tiled<<<static_cast<unsigned int>(n), hadamard_tiled_threads(d), shared, stream>>>(
                xs, ys, hadamard_log2(d), pre, post, scale);
        } else {
            simple<<<static_cast<unsigned int>(n), hadamard_threads(d), shared, stream>>>(xs, ys, d, m, hm, pre, post,
                                                                                          scale);
        }
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    return QVGGT_HADAMARD_OK;
}

}  // namespace qvggt

extern "C" int qvggt_hadamard_launch_schedule(const void* x, void* y, long long rows, int d, int m,
                                              const signed char* hm, const float* pre, const float* post, int dtype,
                                              int schedule, void* stream) {
    const int status = qvggt::hadamard_check(d, m, hm);
    if (status != QVGGT_HADAMARD_OK) return status;
    const int resolved = qvggt::hadamard_schedule(d, m, schedule);
    if (resolved < 0) return resolved;
    if (rows <= 0) return QVGGT_HADAMARD_OK;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case QVGGT_HADAMARD_FP32:
            return qvggt::launch_typed<float>(qvggt_hadamard_simple_f32, qvggt_hadamard_tiled_f32, x, y, rows, d, m,
                                              hm, pre, post, resolved, s);
        case QVGGT_HADAMARD_FP16:
            return qvggt::launch_typed<qvggt::half_bits>(qvggt_hadamard_simple_f16, qvggt_hadamard_tiled_f16, x, y,
                                                         rows, d, m, hm, pre, post, resolved, s);
        case QVGGT_HADAMARD_BF16:
            return qvggt::launch_typed<qvggt::bf16_bits>(qvggt_hadamard_simple_bf16, qvggt_hadamard_tiled_bf16, x, y,
                                                         rows, d, m, hm, pre, post, resolved, s);
        default: return QVGGT_HADAMARD_BAD_DTYPE;
    }
}

extern "C" int qvggt_hadamard_launch(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                                     const float* pre, const float* post, int dtype, void* stream) {
    return qvggt_hadamard_launch_schedule(x, y, rows, d, m, hm, pre, post, dtype, QVGGT_HADAMARD_AUTO, stream);
}
#endif  // !__CUDACC_RTC__
#endif  // __CUDACC__

#ifndef __CUDACC_RTC__
// Host twins: the kernels' schedules with the block's threads run one after another. Each phase of a kernel
// ends at a __syncthreads(), and within a phase no two threads touch the same element, so running the threads
// of a phase in any order gives the kernel's result.
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

extern "C" int qvggt_hadamard_rows_host_tiled(const float* x, float* y, long long rows, int d, const float* pre,
                                              const float* post) {
    const int status = qvggt::hadamard_check(d, 1, nullptr);
    if (status != QVGGT_HADAMARD_OK) return status;
    if (qvggt::hadamard_schedule(d, 1, QVGGT_HADAMARD_TILED) != QVGGT_HADAMARD_TILED) return QVGGT_HADAMARD_BAD_SCHEDULE;
    const int threads = qvggt::hadamard_tiled_threads(d), log_d = qvggt::hadamard_log2(d);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> buf(static_cast<size_t>(qvggt::tiled_shared_floats(d))), regs(static_cast<size_t>(d));  // regs: t*TILE
    for (long long row = 0; row < rows; ++row) {
        for (int t = 0; t < threads; ++t) {
            float* v = &regs[static_cast<size_t>(t) * QVGGT_HADAMARD_TILE];
            qvggt::tiled_load_row(v, x + row * d, pre, t);
            qvggt::tiled_butterfly(v, 0);
        }
        int done = 3, b = 0;
        while (done < log_d) {
            const int next = qvggt::tiled_next_window(done, log_d);
            for (int t = 0; t < threads; ++t) qvggt::tiled_to_shared(buf.data(), &regs[t * QVGGT_HADAMARD_TILE], b, t);
            for (int t = 0; t < threads; ++t) {
                float* v = &regs[static_cast<size_t>(t) * QVGGT_HADAMARD_TILE];
                qvggt::tiled_from_shared(v, buf.data(), next, t);
                qvggt::tiled_butterfly(v, done - next);
            }
            b = next;
            done = next + 3;
        }
        for (int t = 0; t < threads; ++t) {
            qvggt::tiled_store_row(y + row * d, &regs[static_cast<size_t>(t) * QVGGT_HADAMARD_TILE], b, post, scale, t);
        }
    }
    return QVGGT_HADAMARD_OK;
}
#endif  // !__CUDACC_RTC__
