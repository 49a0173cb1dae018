"""Optional compiled CPU kernel behind :func:`qvggt_export.quant.hadamard.fwht` (pure math, no model knowledge).

Why: an eager PyTorch transform is a sequence of separate passes over memory, each a full kernel launch with
its own output allocation, and at d = 4096 that caps it near 15-25x faster than the dense ``x @ H``
(benchmarks/results/fwht_speed.md). This kernel does the whole transform of one row while the row sits in
L1 (16 KiB at d = 4096): signs multiplied on load, the 4 (fp32) or 3 (fp64) innermost radix-2 stages as
one permute + one fused multiply-add each inside a 64-byte vector, the other stages 3 at a time with 8
vectors in registers, the post-scale and normalisation multiplied on the last store. Rows are split over
``torch.get_num_threads()`` POSIX threads (each row is computed the same way whatever the split, so results
do not depend on the thread count).

How it is built: on first use, with the system C++ compiler (``$CXX``, else ``g++``, else ``c++``), into a
per-user cache (``$QVGGT_CACHE_DIR``, else ``$XDG_CACHE_HOME/qvggt_export``, else ``~/.cache/qvggt_export``)
keyed by the source, the compiler's version and this CPU's feature flags (the build uses ``-march=native``,
so a cache shared between different CPUs never loads a foreign binary), written atomically, loaded with
:mod:`ctypes`. Nothing is built at install time and nothing here is required: without a compiler, on an
unsupported platform, with a read-only cache, or with ``QVGGT_FWHT_NATIVE=0`` in the environment,
:func:`load` returns ``None``, :func:`status` says why, and ``fwht`` runs its PyTorch path.

What it does not do (``fwht`` keeps its PyTorch path for these): autograd, tracing / ONNX export /
``torch.compile``, non-CPU tensors. It calls no PyTorch op and no OpenMP: on this shared machine a tiny
multi-threaded PyTorch matmul was measured at ~80 ms under load (threads waiting for each other), so even
the dense Paley factor of ``2^k * m`` sizes (``m`` multiply-adds per element) runs inside the kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_DISABLE = "QVGGT_FWHT_NATIVE"  # "0" disables the kernel
ENV_CACHE = "QVGGT_CACHE_DIR"
_COMPILE_TIMEOUT_S = 120
# Rows below this many elements per thread are not worth a thread start (~20-50 us each).
MIN_ELEMENTS_PER_THREAD = 1 << 15
# Outputs from this size on ask the kernel for transparent huge pages: a fresh 32 MiB tensor costs 8192
# first-touch page faults with 4 KiB pages (measured 9-15 ms here, more than the transform), 16 with 2 MiB.
HUGE_PAGE_MIN_BYTES = 1 << 22

SOURCE = r"""
// Fast Walsh-Hadamard transform of independent rows (see qvggt_export/quant/fwht_native.py).
// y[r] = scale * post * ((pre * x[r]) @ kron(H_n, B)): n = 2^k Sylvester points (unnormalised +-1
// butterflies) of m contiguous elements each, B the caller's dense m x m factor (m > 1), the normalisation
// in scale.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <pthread.h>
#include <sys/mman.h>
#include <vector>

namespace {

template <typename T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); static constexpr int L = 16; };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); static constexpr int L = 8; };
template <typename T> using V = typename Vec<T>::type;

// memcpy compiles to one unaligned vector load/store; rows need not be 64-byte aligned.
template <typename T> inline V<T> load(const T* p) { V<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T> inline void store(T* p, V<T> v) { std::memcpy(p, &v, sizeof(v)); }

// Radix-2 stage h inside a vector: y[i] = x[i] + x[i^h] (bit h of i clear), x[i^h] - x[i] (set), i.e.
// x * sign + swap(x): one permute and one fused multiply-add. Masks must be constants for a single permute.
#if defined(__clang__) || __GNUC__ >= 12
#define QV_SWAP16(v, h) __builtin_shufflevector(v, v, 0^h, 1^h, 2^h, 3^h, 4^h, 5^h, 6^h, 7^h, 8^h, 9^h, 10^h, \
                                                11^h, 12^h, 13^h, 14^h, 15^h)
#define QV_SWAP8(v, h) __builtin_shufflevector(v, v, 0^h, 1^h, 2^h, 3^h, 4^h, 5^h, 6^h, 7^h)
#else
typedef int32_t QvMask16 __attribute__((vector_size(64)));
typedef int64_t QvMask8 __attribute__((vector_size(64)));
#define QV_SWAP16(v, h) __builtin_shuffle(v, QvMask16{0^h, 1^h, 2^h, 3^h, 4^h, 5^h, 6^h, 7^h, 8^h, 9^h, 10^h, \
                                                    11^h, 12^h, 13^h, 14^h, 15^h})
#define QV_SWAP8(v, h) __builtin_shuffle(v, QvMask8{0^h, 1^h, 2^h, 3^h, 4^h, 5^h, 6^h, 7^h})
#endif
#define QV_S(i, h, one) (((i) & (h)) ? -one : one)
#define QV_SIGN16(h) V<float>{QV_S(0, h, 1.f), QV_S(1, h, 1.f), QV_S(2, h, 1.f), QV_S(3, h, 1.f), QV_S(4, h, 1.f), \
    QV_S(5, h, 1.f), QV_S(6, h, 1.f), QV_S(7, h, 1.f), QV_S(8, h, 1.f), QV_S(9, h, 1.f), QV_S(10, h, 1.f), \
    QV_S(11, h, 1.f), QV_S(12, h, 1.f), QV_S(13, h, 1.f), QV_S(14, h, 1.f), QV_S(15, h, 1.f)}
#define QV_SIGN8(h) V<double>{QV_S(0, h, 1.), QV_S(1, h, 1.), QV_S(2, h, 1.), QV_S(3, h, 1.), QV_S(4, h, 1.), \
    QV_S(5, h, 1.), QV_S(6, h, 1.), QV_S(7, h, 1.)}

template <typename T> inline V<T> in_vector(V<T> v);
template <> inline V<float> in_vector<float>(V<float> v) {
    v = v * QV_SIGN16(1) + QV_SWAP16(v, 1);
    v = v * QV_SIGN16(2) + QV_SWAP16(v, 2);
    v = v * QV_SIGN16(4) + QV_SWAP16(v, 4);
    return v * QV_SIGN16(8) + QV_SWAP16(v, 8);
}
template <> inline V<double> in_vector<double>(V<double> v) {
    v = v * QV_SIGN8(1) + QV_SWAP8(v, 1);
    v = v * QV_SIGN8(2) + QV_SWAP8(v, 2);
    return v * QV_SIGN8(4) + QV_SWAP8(v, 4);
}

// R radix-2 stages across whole vectors at vector stride s, 2^R vectors in registers (R = 3 measured best:
// R = 4 spills and ran 2x slower). On the last pass, post and scale are applied on the way out.
template <typename T, int R>
inline void cross_pass(T* y, int64_t nv, int64_t s, const T* post, T scale, bool last) {
    constexpr int L = Vec<T>::L, K = 1 << R;
    for (int64_t b = 0; b < nv; b += s * K) {
        for (int64_t j = 0; j < s; ++j) {
            V<T> a[K];
            for (int k = 0; k < K; ++k) a[k] = load<T>(y + (b + j + k * s) * L);
            for (int h = 1; h < K; h <<= 1)
                for (int k = 0; k < K; ++k)
                    if (!(k & h)) { V<T> u = a[k], w = a[k + h]; a[k] = u + w; a[k + h] = u - w; }
            for (int k = 0; k < K; ++k) {
                const int64_t off = (b + j + k * s) * L;
                V<T> out = a[k];
                if (last) { if (post) out *= load<T>(post + off); out *= scale; }
                store<T>(y + off, out);
            }
        }
    }
}

// m == 1 and n >= L: the row is nv = n / L vectors.
template <typename T>
void row_vector(const T* x, T* y, int64_t n, const T* pre, const T* post, T scale) {
    constexpr int L = Vec<T>::L;
    const int64_t nv = n / L;
    for (int64_t v = 0; v < nv; ++v) {
        V<T> a = load<T>(x + v * L);
        if (pre) a *= load<T>(pre + v * L);
        a = in_vector<T>(a);
        if (nv == 1) { if (post) a *= load<T>(post); a *= scale; }
        store<T>(y + v * L, a);
    }
    int64_t s = 1;
    while (s < nv) {
        int left = 0;
        for (int64_t t = nv / s; t > 1; t >>= 1) ++left;
        const int r = left >= 3 ? 3 : left;
        const bool last = r == left;
        if (r == 3) cross_pass<T, 3>(y, nv, s, post, scale, last);
        else if (r == 2) cross_pass<T, 2>(y, nv, s, post, scale, last);
        else cross_pass<T, 1>(y, nv, s, post, scale, last);
        s <<= r;
    }
}

// block' = block @ base (row-major m x m) for each of the n blocks of m contiguous elements. With m a
// compile-time constant (the common Paley orders) the accumulators stay in registers and the loops vectorise:
// measured 7-14x faster at m = 12 than the generic loop, which serves the other orders (at m = 36 the
// fixed form spills registers and was slower).
template <typename T, int M>
void paley_fixed(T* y, int64_t n, const T* base) {
    for (int64_t b = 0; b < n * M; b += M) {
        T acc[M] = {};
        for (int r = 0; r < M; ++r) {
            const T v = y[b + r];
            for (int c = 0; c < M; ++c) acc[c] += v * base[r * M + c];
        }
        for (int c = 0; c < M; ++c) y[b + c] = acc[c];
    }
}

template <typename T>
void paley_blocks(T* __restrict__ y, int64_t n, int64_t m, const T* __restrict__ base, T* __restrict__ tmp) {
    switch (m) {
        case 12: paley_fixed<T, 12>(y, n, base); return;
        case 20: paley_fixed<T, 20>(y, n, base); return;
        case 28: paley_fixed<T, 28>(y, n, base); return;
        default: break;
    }
    for (int64_t b = 0; b < n * m; b += m) {
        for (int64_t c = 0; c < m; ++c) tmp[c] = 0;
        for (int64_t r = 0; r < m; ++r) {
            const T v = y[b + r];
            for (int64_t c = 0; c < m; ++c) tmp[c] += v * base[r * m + c];
        }
        for (int64_t c = 0; c < m; ++c) y[b + c] = tmp[c];
    }
}

// Any n, m: the dense m x m Paley factor per block (above), then radix-2 stages at flat strides m, 2m, ...,
// (n/2)m (the compiler vectorises the inner loop).
template <typename T>
void row_generic(const T* x, T* y, int64_t n, int64_t m, const T* pre, const T* base, const T* post, T scale,
                 T* tmp) {
    const int64_t d = n * m;
    for (int64_t i = 0; i < d; ++i) y[i] = pre ? x[i] * pre[i] : x[i];
    if (m > 1) paley_blocks<T>(y, n, m, base, tmp);
    for (int64_t s = m; s < d; s <<= 1)
        for (int64_t b = 0; b < d; b += 2 * s)
            for (int64_t j = b; j < b + s; ++j) { const T u = y[j], w = y[j + s]; y[j] = u + w; y[j + s] = u - w; }
    for (int64_t i = 0; i < d; ++i) y[i] = (post ? y[i] * post[i] : y[i]) * scale;
}

template <typename T> struct Job {
    const T* x; T* y; int64_t rows, n, m; const T* pre; const T* base; const T* post; T scale;
};

template <typename T> void run_rows(const Job<T>& job, int64_t r0, int64_t r1) {
    const int64_t d = job.n * job.m;
    if (job.m == 1 && job.n >= Vec<T>::L) {
        for (int64_t r = r0; r < r1; ++r)
            row_vector<T>(job.x + r * d, job.y + r * d, job.n, job.pre, job.post, job.scale);
        return;
    }
    std::vector<T> tmp(size_t(job.m));
    for (int64_t r = r0; r < r1; ++r)
        row_generic<T>(job.x + r * d, job.y + r * d, job.n, job.m, job.pre, job.base, job.post, job.scale, tmp.data());
}

// Threads take chunks of rows from a shared counter rather than fixed halves: on a shared machine a
// descheduled thread then delays the call by one chunk, not by its whole share. Each row is computed the
// same way whichever thread takes it, so results do not depend on the schedule.
template <typename T> struct Work { const Job<T>* job; std::atomic<int64_t> next; int64_t chunk; };

template <typename T> void drain(Work<T>* work) {
    for (;;) {
        const int64_t r0 = work->next.fetch_add(work->chunk, std::memory_order_relaxed);
        if (r0 >= work->job->rows) return;
        run_rows<T>(*work->job, r0, std::min(r0 + work->chunk, work->job->rows));
    }
}

template <typename T> void* worker(void* arg) {
    drain<T>(static_cast<Work<T>*>(arg));
    return nullptr;
}

constexpr int kMaxThreads = 256;

template <typename T> int transform(const Job<T>& job, int threads) {
    if (job.rows < 0 || job.n < 1 || job.m < 1 || (job.n & (job.n - 1)) != 0) return 1;
    if (job.m > 1 && job.base == nullptr) return 2;
    if (job.rows == 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > kMaxThreads) threads = kMaxThreads;
    if (threads > job.rows) threads = int(job.rows);
    if (threads == 1) { run_rows<T>(job, 0, job.rows); return 0; }
    // About 16 chunks per thread, each of at least 64 KiB of rows.
    const int64_t bytes = job.n * job.m * int64_t(sizeof(T));
    const int64_t chunk = std::max<int64_t>({1, job.rows / (16 * threads), (int64_t(1) << 16) / bytes});
    Work<T> work{&job, {0}, chunk};
    pthread_t ids[kMaxThreads];
    int started = 1;
    while (started < threads && pthread_create(&ids[started], nullptr, worker<T>, &work) == 0) ++started;
    drain<T>(&work);  // the calling thread works too (and alone if no thread could start)
    for (int t = 1; t < started; ++t) pthread_join(ids[t], nullptr);
    return 0;
}

}  // namespace

extern "C" {

int qvggt_fwht_f32(const float* x, float* y, int64_t rows, int64_t n, int64_t m, const float* pre,
                   const float* base, const float* post, float scale, int threads) {
    return transform<float>({x, y, rows, n, m, pre, base, post, scale}, threads);
}

int qvggt_fwht_f64(const double* x, double* y, int64_t rows, int64_t n, int64_t m, const double* pre,
                   const double* base, const double* post, double scale, int threads) {
    return transform<double>({x, y, rows, n, m, pre, base, post, scale}, threads);
}

// Ask for transparent huge pages on the 2 MiB-aligned part of a fresh buffer (before its first touch).
int qvggt_advise_huge(void* p, int64_t nbytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t page = uintptr_t(1) << 21;
    const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
    const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + uintptr_t(nbytes)) & ~(page - 1);
    if (e > a) return madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
    (void)p; (void)nbytes;
    return 0;
}

}
"""

_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # -march=native first; some compilers/targets refuse it
_COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-pthread", "-x", "c++"]


class Kernel:
    """The loaded library: typed entry points over contiguous CPU tensors."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._f32 = lib.qvggt_fwht_f32
        self._f32.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_float, ctypes.c_int]
        self._f64 = lib.qvggt_fwht_f64
        self._f64.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ctypes.c_double, ctypes.c_int]
        for fn in (self._f32, self._f64):
            fn.restype = ctypes.c_int
        self._advise = lib.qvggt_advise_huge
        self._advise.argtypes = [ptr, i64]
        self._advise.restype = ctypes.c_int

    def empty(self, rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        """A fresh ``[rows, d]`` output, on huge pages where the OS grants them (large sizes only)."""
        out = torch.empty(rows, d, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes >= HUGE_PAGE_MIN_BYTES:
            self._advise(out.data_ptr(), nbytes)  # advice only: a refusal leaves ordinary pages
        return out

    def transform(self, x: torch.Tensor, y: torch.Tensor, n: int, m: int, pre: torch.Tensor | None,
                  base: torch.Tensor | None, post: torch.Tensor | None, scale: float, threads: int) -> None:
        """``y = scale * post * ((pre * x) @ kron(H_n, base))`` row by row, ``H_n`` the +-1 Sylvester matrix.

        ``x`` and ``y`` are contiguous ``[rows, n * m]`` CPU tensors of one dtype (float32 or float64) and
        may be the same tensor; ``pre``/``post`` contiguous ``[n * m]`` of that dtype or ``None``; ``base``
        the contiguous ``[m, m]`` factor (``None`` when ``m == 1``).
        """
        fn = self._f32 if x.dtype == torch.float32 else self._f64
        ptr = [t.data_ptr() if t is not None else None for t in (pre, base, post)]
        status = fn(x.data_ptr(), y.data_ptr(), int(x.shape[0]), n, m, *ptr, scale, threads)
        if status != 0:  # the caller validated every argument: a nonzero status is a bug here
            raise RuntimeError(f"native FWHT kernel rejected rows={x.shape[0]}, n={n}, m={m} (status {status})")


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qvggt_export"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            lines = [ln for ln in handle if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        parts += sorted(set(lines))
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def build(cache_dir: Path, compiler: str | None) -> tuple[Kernel | None, str]:
    """Compile (or reuse from ``cache_dir``) and load the kernel.

    Args:
        cache_dir: Folder for the shared library; created if missing.
        compiler: Path of a C++ compiler, or ``None``.

    Returns:
        ``(kernel, "")`` on success, else ``(None, reason)``; never raises for an unusable toolchain.
    """
    if compiler is None:
        return None, "no C++ compiler found (set $CXX or install g++)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {compiler} --version: {exc}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cache folder {cache_dir} is not usable: {exc}"
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([SOURCE, compiler, version, *flags, *_COMMON_FLAGS,
                                        _cpu_fingerprint()]).encode()).hexdigest()[:16]
        path = cache_dir / f"fwht_{key}.so"
        if not path.exists():
            error = _compile(compiler, flags, path)
            if error:
                errors.append(error)
                continue
        try:
            return Kernel(ctypes.CDLL(str(path)), path), ""
        except (OSError, AttributeError) as exc:
            errors.append(f"cannot load {path}: {exc}")
    return None, "; ".join(errors)


def _compile(compiler: str, flags: list[str], path: Path) -> str:
    """Build ``path`` atomically (temp file in the same folder, then rename); the error text or ``""``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, *_COMMON_FLAGS, "-o", tmp, "-"], input=SOURCE,
                              capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            return f"{compiler} {' '.join(flags)} failed: {proc.stderr.strip()[-500:]}"
        os.replace(tmp, path)
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{compiler} {' '.join(flags)} failed: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_lock = threading.Lock()
_state: dict[str, object] = {}


def load() -> Kernel | None:
    """The process's kernel, built or loaded on the first call; ``None`` when unavailable (see :func:`status`)."""
    if "kernel" in _state:
        return _state["kernel"]  # type: ignore[return-value]
    with _lock:
        if "kernel" not in _state:
            if os.environ.get(ENV_DISABLE, "1").strip() == "0":
                kernel, reason = None, f"disabled by {ENV_DISABLE}=0"
            else:
                try:
                    kernel, reason = build(_cache_dir(), _compiler())
                except Exception as exc:  # noqa: BLE001  # an optional accelerator must never break fwht
                    kernel, reason = None, f"{type(exc).__name__}: {exc}"
            if kernel is None:
                log.info("native FWHT kernel unavailable, using the PyTorch path: %s", reason)
            _state["reason"] = reason
            _state["kernel"] = kernel
    return _state["kernel"]  # type: ignore[return-value]


def status() -> str:
    """``"native (<library path>)"`` or ``"unavailable: <reason>"`` (builds on first call, as :func:`load`)."""
    kernel = load()
    return f"native ({kernel.path})" if kernel is not None else f"unavailable: {_state['reason']}"
