// Fused Hadamard transform y = ((x * pre) @ H) * post over the last axis (DESIGN.md section 4).
//
// H is the normalised kron(H_{2^k}, H_m) of qvggt_export.quant.hadamard (row-vector convention, the matrix
// fwht() applies): a fast Walsh-Hadamard transform over the 2^k axis and, for m > 1, a small dense +-1 factor
// H_m over the innermost axis (channel c = j * m + s). One thread block transforms one row (token) in shared
// memory; scales are fp32, arithmetic is fp32 for every storage type.
//
// The per-row algorithm lives in the QVGGT_HD functions below, compiled both for the device (the kernel in
// hadamard_kernel.cu) and for the host (qvggt_hadamard_rows_host, which runs the same functions for every
// simulated thread in turn). What is verified without a GPU (tests/plugins/test_hadamard_plugin.py): the
// host build of these functions against fwht(), and that hadamard_kernel.cu compiles for sm_80/86/89/90/120.
// NOT verified there: device execution (launch configuration, shared memory, synchronisation, fp16/bf16 I/O).
#ifndef QVGGT_HADAMARD_KERNEL_H
#define QVGGT_HADAMARD_KERNEL_H

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QVGGT_HD __host__ __device__ __forceinline__
#else
#define QVGGT_HD inline
#endif

// Largest d: d fp32 values of dynamic shared memory must fit the 48 KiB available without opting in.
#define QVGGT_HADAMARD_MAX_SIZE 8192
#define QVGGT_HADAMARD_MAX_THREADS 512

// Storage types of x and y (the scales are always fp32).
#define QVGGT_HADAMARD_FP32 0
#define QVGGT_HADAMARD_FP16 1
#define QVGGT_HADAMARD_BF16 2

// Error codes of the launchers (cudaError_t values are positive).
#define QVGGT_HADAMARD_OK 0
#define QVGGT_HADAMARD_BAD_SIZE (-1)   // d out of range, not divisible by m, or d / m not a power of two
#define QVGGT_HADAMARD_NO_FACTOR (-2)  // m > 1 without the H_m matrix
#define QVGGT_HADAMARD_BAD_DTYPE (-3)

#ifdef __cplusplus
namespace qvggt {

// Threads per block for size d: one butterfly pair per thread up to the block limit (d / 2 pairs per stage).
QVGGT_HD int hadamard_threads(int d) {
    int t = d / 2;
    if (t < 32) t = 32;
    if (t > QVGGT_HADAMARD_MAX_THREADS) t = QVGGT_HADAMARD_MAX_THREADS;
    return t;
}

QVGGT_HD int hadamard_check(int d, int m, const signed char* hm) {
    if (d < 1 || d > QVGGT_HADAMARD_MAX_SIZE || m < 1 || d % m != 0) return QVGGT_HADAMARD_BAD_SIZE;
    int p = d / m;
    if ((p & (p - 1)) != 0) return QVGGT_HADAMARD_BAD_SIZE;
    if (m > 1 && hm == nullptr) return QVGGT_HADAMARD_NO_FACTOR;
    return QVGGT_HADAMARD_OK;
}

QVGGT_HD float to_float(float v) { return v; }
QVGGT_HD void from_float(float v, float* out) { *out = v; }
#ifdef __CUDACC__
// Half storage types exist only in CUDA builds (declared before the templates that call them).
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_float(float v, __half* out) { *out = __float2half_rn(v); }
__device__ __forceinline__ void from_float(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }
#endif

// Load phase: buf[j*m + s] = sum_r (x * pre)[j*m + r] * H_m[r, s]  (buf = x * pre when m == 1).
// hm is the +-1 matrix H_m row-major (int8); the 1/sqrt(d) of the whole transform is applied in the store.
template <typename T>
QVGGT_HD void hadamard_load(float* buf, const T* x, int d, int m, const signed char* hm, const float* pre,
                            int tid, int nthreads) {
    for (int c = tid; c < d; c += nthreads) {
        if (m == 1) {
            buf[c] = to_float(x[c]) * (pre ? pre[c] : 1.0f);
        } else {
            const int base = c - c % m, s = c % m;
            float acc = 0.0f;
            for (int r = 0; r < m; ++r) {
                acc += to_float(x[base + r]) * (pre ? pre[base + r] : 1.0f) * static_cast<float>(hm[r * m + s]);
            }
            buf[c] = acc;
        }
    }
}

// One Sylvester stage of span h over the 2^k axis (element j*m + s): pairs (j, j + h) with j % 2h < h.
// The d / 2 pairs of a stage are independent; threads take pairs tid, tid + nthreads, ...
QVGGT_HD void hadamard_butterfly(float* buf, int d, int m, int h, int tid, int nthreads) {
    const int pairs = d / 2;
    for (int p = tid; p < pairs; p += nthreads) {
        const int s = p % m, q = p / m;
        const int j = (q / h) * 2 * h + q % h;
        const int a = j * m + s, b = a + h * m;
        const float u = buf[a], v = buf[b];
        buf[a] = u + v;
        buf[b] = u - v;
    }
}

// Store phase: y = buf * (1/sqrt(d)) * post, converted to the storage type.
template <typename T>
QVGGT_HD void hadamard_store(T* y, const float* buf, int d, const float* post, float scale, int tid, int nthreads) {
    for (int c = tid; c < d; c += nthreads) {
        from_float(buf[c] * scale * (post ? post[c] : 1.0f), &y[c]);
    }
}

}  // namespace qvggt
#endif  // __cplusplus

#ifdef __cplusplus
extern "C" {
#endif

// Launch y = ((x * pre) @ H) * post on `stream` (a cudaStream_t; NULL for the legacy default stream).
//   x, y:  device pointers, rows x d contiguous, storage type `dtype` (QVGGT_HADAMARD_FP32/FP16/BF16);
//          y may equal x (each block reads its row into shared memory before writing it).
//   m, hm: Paley order and its +-1 matrix (device, m*m int8, row-major); m = 1 and hm = NULL for d = 2^k.
//   pre, post: device fp32 [d] vectors, or NULL for all ones.
// Returns QVGGT_HADAMARD_OK, a negative QVGGT_HADAMARD_* code, or the cudaError_t of the launch.
int qvggt_hadamard_launch(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                          const float* pre, const float* post, int dtype, void* stream);

// Host twin of the kernel for fp32 (no GPU needed): runs the same per-row functions, simulating `nthreads`
// threads in turn between the same barriers (nthreads <= 0: the kernel's block size for d).
int qvggt_hadamard_rows_host(const float* x, float* y, long long rows, int d, int m, const signed char* hm,
                             const float* pre, const float* post, int nthreads);

#ifdef __cplusplus
}
#endif

#endif  // QVGGT_HADAMARD_KERNEL_H
