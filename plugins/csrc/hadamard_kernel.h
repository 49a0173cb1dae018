// Fused Hadamard transform y = ((x * pre) @ H) * post over the last axis (DESIGN.md section 4).
//
// H is the normalised kron(H_{2^k}, H_m) of qvggt_export.quant.hadamard (row-vector convention, the matrix
// fwht() applies): a fast Walsh-Hadamard transform over the 2^k axis and, for m > 1, a small dense +-1 factor
// H_m over the innermost axis (channel c = j * m + s). One thread block transforms one row (token); scales are
// fp32, arithmetic is fp32 for every storage type.
//
// Two schedules, both built from the QVGGT_HD functions below so that the host twin (qvggt_hadamard_rows_host*)
// runs exactly the kernel's per-thread code for every simulated thread in turn:
//   * "simple" (any supported d, and the only one for m > 1): the row in shared memory, one butterfly stage of
//     the 2^k axis per barrier.
//   * "tiled" (m == 1, d = 2^L >= 256): each thread holds 8 elements in registers and applies three butterfly
//     stages per round without a barrier; between rounds the row goes through shared memory to regroup the
//     index bits (ceil(L / 3) rounds instead of L barriers, vector loads from global memory).
//
// This header compiles three ways: as plain C++ (host twin only), with nvcc, and with NVRTC (the runtime
// compiler qvggt_export.plugins.hadamard_cuda uses: it must not include any header, so the fp16/bf16 storage types
// are our own two-byte structs converted with PTX instructions rather than cuda_fp16.h / cuda_bf16.h).
#ifndef QVGGT_HADAMARD_KERNEL_H
#define QVGGT_HADAMARD_KERNEL_H

#ifdef __CUDACC__
#define QVGGT_HD __host__ __device__ __forceinline__
#define QVGGT_UNROLL _Pragma("unroll")
#else
#define QVGGT_HD inline
#define QVGGT_UNROLL
#endif

// Largest d: d fp32 values of dynamic shared memory (d + d / 32 for the tiled schedule) must fit the 48 KiB
// available without opting in.
#define QVGGT_HADAMARD_MAX_SIZE 8192
#define QVGGT_HADAMARD_MAX_THREADS 512
// The tiled schedule: elements per thread (3 index bits per round) and the smallest d it is used for.
#define QVGGT_HADAMARD_TILE 8
#define QVGGT_HADAMARD_TILED_MIN_SIZE 256

// Storage types of x and y (the scales are always fp32).
#define QVGGT_HADAMARD_FP32 0
#define QVGGT_HADAMARD_FP16 1
#define QVGGT_HADAMARD_BF16 2

// Schedules (qvggt_hadamard_launch_schedule; qvggt_hadamard_launch picks AUTO).
#define QVGGT_HADAMARD_AUTO 0
#define QVGGT_HADAMARD_SIMPLE 1
#define QVGGT_HADAMARD_TILED 2

// Error codes of the launchers (cudaError_t values are positive).
#define QVGGT_HADAMARD_OK 0
#define QVGGT_HADAMARD_BAD_SIZE (-1)   // d out of range, not divisible by m, or d / m not a power of two
#define QVGGT_HADAMARD_NO_FACTOR (-2)  // m > 1 without the H_m matrix
#define QVGGT_HADAMARD_BAD_DTYPE (-3)
#define QVGGT_HADAMARD_BAD_SCHEDULE (-4)  // tiled asked for m > 1 or d < QVGGT_HADAMARD_TILED_MIN_SIZE

#ifdef __cplusplus
namespace qvggt {

// Threads per block of the simple schedule for size d: one butterfly pair per thread up to the block limit.
QVGGT_HD int hadamard_threads(int d) {
    int t = d / 2;
    if (t < 32) t = 32;
    if (t > QVGGT_HADAMARD_MAX_THREADS) t = QVGGT_HADAMARD_MAX_THREADS;
    return t;
}

// Threads per block of the tiled schedule: QVGGT_HADAMARD_TILE elements each (d = 8192 -> 1024 threads).
QVGGT_HD int hadamard_tiled_threads(int d) { return d / QVGGT_HADAMARD_TILE; }

QVGGT_HD int hadamard_log2(int p) {
    int bits = 0;
    while ((1 << bits) < p) ++bits;
    return bits;
}

QVGGT_HD int hadamard_check(int d, int m, const signed char* hm) {
    if (d < 1 || d > QVGGT_HADAMARD_MAX_SIZE || m < 1 || d % m != 0) return QVGGT_HADAMARD_BAD_SIZE;
    int p = d / m;
    if ((p & (p - 1)) != 0) return QVGGT_HADAMARD_BAD_SIZE;
    if (m > 1 && hm == nullptr) return QVGGT_HADAMARD_NO_FACTOR;
    return QVGGT_HADAMARD_OK;
}

// The schedule AUTO resolves to, or QVGGT_HADAMARD_BAD_SCHEDULE for a request the size cannot take.
QVGGT_HD int hadamard_schedule(int d, int m, int requested) {
    const bool tiled_ok = m == 1 && d >= QVGGT_HADAMARD_TILED_MIN_SIZE;
    if (requested == QVGGT_HADAMARD_AUTO) return tiled_ok ? QVGGT_HADAMARD_TILED : QVGGT_HADAMARD_SIMPLE;
    if (requested == QVGGT_HADAMARD_SIMPLE) return QVGGT_HADAMARD_SIMPLE;
    if (requested == QVGGT_HADAMARD_TILED) return tiled_ok ? QVGGT_HADAMARD_TILED : QVGGT_HADAMARD_BAD_SCHEDULE;
    return QVGGT_HADAMARD_BAD_SCHEDULE;
}

QVGGT_HD float to_float(float v) { return v; }
QVGGT_HD void from_float(float v, float* out) { *out = v; }

#ifdef __CUDACC__
// Two-byte storage types (IEEE half, bfloat16), converted with PTX so that NVRTC needs no header.
struct half_bits { unsigned short bits; };
struct bf16_bits { unsigned short bits; };

__device__ __forceinline__ float to_float(half_bits v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_float(bf16_bits v) { return __uint_as_float(static_cast<unsigned int>(v.bits) << 16); }
__device__ __forceinline__ void from_float(float v, half_bits* out) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    out->bits = h;
}
__device__ __forceinline__ void from_float(float v, bf16_bits* out) {  // round to nearest even
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    out->bits = h;
#else  // older targets (a default nvcc build) have no bf16 conversion instruction: the same rounding in bits
    const unsigned int u = __float_as_uint(v);
    out->bits = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<unsigned short>((u >> 16) | 0x40u)  // quiet NaN
                                                : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
#endif

// ---- simple schedule --------------------------------------------------------------------------------------------

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

// ---- tiled schedule (m == 1, d = 2^L, L >= 8) ---------------------------------------------------------------------
// A round works on a window of 3 index bits starting at bit b: thread t holds the 8 elements whose index has
// t's bits below b, then k (the register, 3 bits), then t's remaining bits. Butterfly stages act on one index
// bit each and commute, so any order of the L stages gives H (float rounding differs from fwht's order by ulps).

QVGGT_HD int tiled_index(int b, int t, int k) {
    const int low = t & ((1 << b) - 1);
    return ((t >> b) << (b + 3)) | (k << b) | low;
}

// Stages for register bits first..2 (bit i pairs registers k and k + 2^i).
QVGGT_HD void tiled_butterfly(float* v, int first) {
    // Fully unrolled with constant register indices (a runtime index would put v in local memory).
    QVGGT_UNROLL
    for (int bit = 0; bit < 3; ++bit) {
        if (bit < first) continue;
        const int h = 1 << bit;
        QVGGT_UNROLL
        for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) {
            if (k & h) continue;
            const float u = v[k], w = v[k + h];
            v[k] = u + w;
            v[k + h] = u - w;
        }
    }
}

// Round 0 reads the row from global memory: window b = 0, i.e. 8 contiguous elements per thread.
template <typename T>
QVGGT_HD void tiled_load_row(float* v, const T* x, const float* pre, int t) {
    QVGGT_UNROLL
    for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) {
        const int c = t * QVGGT_HADAMARD_TILE + k;
        v[k] = to_float(x[c]) * (pre ? pre[c] : 1.0f);
    }
}

// Shared-memory slot of an element: one float of padding per 32 spreads a warp's accesses of round 0 (8 contiguous
// elements per thread, stride 8) over all 32 banks instead of 4 (and halves the conflicts of the next round).
QVGGT_HD int tiled_slot(int index) { return index + (index >> 5); }
QVGGT_HD int tiled_shared_floats(int d) { return d + d / 32; }

QVGGT_HD void tiled_to_shared(float* buf, const float* v, int b, int t) {
    QVGGT_UNROLL
    for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) buf[tiled_slot(tiled_index(b, t, k))] = v[k];
}

QVGGT_HD void tiled_from_shared(float* v, const float* buf, int b, int t) {
    QVGGT_UNROLL
    for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) v[k] = buf[tiled_slot(tiled_index(b, t, k))];
}

// The last round writes y from registers: consecutive threads hold consecutive indices (coalesced).
template <typename T>
QVGGT_HD void tiled_store_row(T* y, const float* v, int b, const float* post, float scale, int t) {
    QVGGT_UNROLL
    for (int k = 0; k < QVGGT_HADAMARD_TILE; ++k) {
        const int c = tiled_index(b, t, k);
        from_float(v[k] * scale * (post ? post[c] : 1.0f), &y[c]);
    }
}

// Window of the round after `done` index bits were transformed (the last window ends at bit L), and the first
// register bit still to transform in it.
QVGGT_HD int tiled_next_window(int done, int log_d) { return done < log_d - 3 ? done : log_d - 3; }

}  // namespace qvggt
#endif  // __cplusplus

#if defined(__cplusplus) && !defined(__CUDACC_RTC__)
extern "C" {

// Launch y = ((x * pre) @ H) * post on `stream` (a cudaStream_t; NULL for the legacy default stream).
//   x, y:  device pointers, rows x d contiguous, storage type `dtype` (QVGGT_HADAMARD_FP32/FP16/BF16);
//          y may equal x (each block reads its row before writing it).
//   m, hm: Paley order and its +-1 matrix (device, m*m int8, row-major); m = 1 and hm = NULL for d = 2^k.
//   pre, post: device fp32 [d] vectors, or NULL for all ones.
// Returns QVGGT_HADAMARD_OK, a negative QVGGT_HADAMARD_* code, or the cudaError_t of the launch.
int qvggt_hadamard_launch(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                          const float* pre, const float* post, int dtype, void* stream);
// The same with an explicit schedule (QVGGT_HADAMARD_AUTO / SIMPLE / TILED).
int qvggt_hadamard_launch_schedule(const void* x, void* y, long long rows, int d, int m, const signed char* hm,
                                   const float* pre, const float* post, int dtype, int schedule, void* stream);

// Host twin of the kernel for fp32 (no GPU needed): runs the same per-thread functions, simulating the block's
// threads in turn between the same barriers. Simple schedule: `nthreads` threads (<= 0: the kernel's block size).
int qvggt_hadamard_rows_host(const float* x, float* y, long long rows, int d, int m, const signed char* hm,
                             const float* pre, const float* post, int nthreads);
// Host twin of the tiled schedule (m == 1, d >= QVGGT_HADAMARD_TILED_MIN_SIZE; its block size is fixed).
int qvggt_hadamard_rows_host_tiled(const float* x, float* y, long long rows, int d, const float* pre,
                                   const float* post);

}
#endif

#endif  // QVGGT_HADAMARD_KERNEL_H
