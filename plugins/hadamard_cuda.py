"""Launch the fused Hadamard CUDA kernel (``csrc/hadamard_kernel.cu``) from Python, on any CUDA stream.

The kernel source is compiled with NVRTC at first use for the GPU at hand (``sm_XY`` machine code), cached on
disk (``$QVGGT_CACHE_DIR/hadamard_cuda``, else ``~/.cache/qvggt_export/hadamard_cuda``; keyed by the source, the
architecture and the NVRTC version) and launched through the CUDA driver API on a caller's stream. Two entry
points:

* :func:`launch_hadamard` takes raw device pointers and a stream handle: what the TensorRT plugin's ``enqueue``
  passes (TensorRT's buffers and stream), with no PyTorch involved;
* :func:`hadamard_cuda` takes CUDA tensors (PyTorch) and runs on the current PyTorch stream: the same math as
  :func:`qvggt_export.quant.hadamard.fwht` (``((x * signs) @ H) * post``), used by the GPU tests and by
  ``benchmarks/gpu_check.py``.

Why NVIDIA's ``cuda-python`` (``cuda.bindings``: NVRTC + driver API) rather than the alternatives: it needs no
nvcc or host compiler on the serving machine (NVRTC ships as the ``nvidia-cuda-nvrtc`` wheel), it works on raw
pointers and foreign streams (TensorRT's), so the plugin's enqueue does not depend on PyTorch, and it is the
package TensorRT's own Python samples use. ``torch.utils.cpp_extension`` would need nvcc and a C++ toolchain at
run time; CuPy would add a large second array library for one kernel. Install it with
``pip install 'qvggt-export[cuda]'`` (``cuda-bindings``, ``nvidia-cuda-nvrtc``).

Needs a CUDA GPU to launch. Without one, :func:`compile_kernel_source` still compiles the source with NVRTC
(the CPU test does that); nothing else here can be exercised.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvggt_export.errors import MissingDependencyError, QVGGTError

__all__ = [
    "DTYPE_CODES",
    "SCHEDULES",
    "compile_kernel_source",
    "hadamard_cuda",
    "kernel_unavailable_reason",
    "launch_hadamard",
]

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
KERNEL_FILE = "hadamard_kernel.cu"
HEADER_FILE = "hadamard_kernel.h"
#: Storage type name -> kernel suffix (the scales are always fp32).
DTYPE_CODES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
#: Schedules of the kernel (see ``csrc/hadamard_kernel.h``); "auto" = tiled where it applies, else simple.
SCHEDULES = ("auto", "simple", "tiled")
MAX_SIZE = 8192          # QVGGT_HADAMARD_MAX_SIZE
SIMPLE_MAX_THREADS = 512  # QVGGT_HADAMARD_MAX_THREADS
TILE = 8                 # QVGGT_HADAMARD_TILE
TILED_MIN_SIZE = 256     # QVGGT_HADAMARD_TILED_MIN_SIZE
_MAX_GRID = 2**31 - 1
_INSTALL_HINT = "pip install 'qvggt-export[cuda]' (cuda-bindings and nvidia-cuda-nvrtc)"


def _bindings() -> tuple[Any, Any]:
    """``(driver, nvrtc)`` from cuda-python (the 12.6+/13.x layout, or the older ``cuda.cuda`` one)."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import nvrtc  # type: ignore[no-redef]
        except ImportError as exc:
            raise MissingDependencyError(f"the fused Hadamard kernel needs NVIDIA cuda-python: {_INSTALL_HINT}") \
                from exc
    return driver, nvrtc


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(status, *values)`` tuple, raising :class:`QVGGTError` on a CUDA/NVRTC error."""
    status, *values = result
    if int(status) != 0:
        raise QVGGTError(f"{what} failed: {getattr(status, 'name', status)}")
    return values[0] if len(values) == 1 else tuple(values)


def kernel_unavailable_reason() -> str | None:
    """``None`` when the kernel can be compiled here (cuda-python and NVRTC load), else why not."""
    try:
        _, nvrtc = _bindings()
        _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except (MissingDependencyError, QVGGTError, OSError, RuntimeError) as exc:
        return str(exc)
    return None


def _cache_dir() -> Path:
    if os.environ.get("QVGGT_CACHE_DIR"):
        return Path(os.environ["QVGGT_CACHE_DIR"]) / "hadamard_cuda"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qvggt_export" / "hadamard_cuda"


def compile_kernel_source(arch: str, *, cache: bool = True) -> bytes:
    """The kernel compiled by NVRTC to a cubin for ``arch`` (``"sm_90"``), from the disk cache when present.

    Runs without a GPU (NVRTC is a compiler library).

    Raises:
        MissingDependencyError: cuda-python / NVRTC are not installed.
        QVGGTError: the compilation failed (the NVRTC log is in the message).
    """
    _, nvrtc = _bindings()
    source = (CSRC_DIR / KERNEL_FILE).read_bytes()
    header = (CSRC_DIR / HEADER_FILE).read_bytes()
    version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    options = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
    key = hashlib.sha256(b"\0".join([source, header, arch.encode(), repr(version).encode(), *options])).hexdigest()
    cached = _cache_dir() / f"hadamard_{arch}_{key[:24]}.cubin"
    if cache and cached.is_file():
        return cached.read_bytes()
    program = _check(nvrtc.nvrtcCreateProgram(source, KERNEL_FILE.encode(), 1, [header], [HEADER_FILE.encode()]),
                     "nvrtcCreateProgram")
    try:
        (status,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if int(status) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            raise QVGGTError(f"NVRTC could not compile {KERNEL_FILE} for {arch}: "
                             f"{log.decode(errors='replace').strip()[-2000:]}")
        size = _check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    if cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_bytes(cubin)
            os.replace(temporary, cached)  # atomic: a concurrent reader sees the old file or the whole new one
        except OSError as exc:  # a read-only cache only costs a recompilation next time
            logger.debug("could not cache the Hadamard cubin in %s: %s", cached.parent, exc)
    return cubin


@dataclass
class _LoadedKernel:
    module: Any
    functions: dict[str, Any]
    factors: dict[int, int]  # Paley order m -> device pointer of its int8 H_m


_LOADED: dict[int, _LoadedKernel] = {}  # CUcontext handle -> module loaded in it
_LOCK = threading.Lock()


def _current_context(driver: Any, device: int | None) -> Any:
    """The current CUDA context (TensorRT's / PyTorch's, both the device's primary context); when there is none,
    the primary context of ``device`` (default 0) is made current."""
    _check(driver.cuInit(0), "cuInit")
    context = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(context) != 0:
        return context
    handle = _check(driver.cuDeviceGet(device or 0), "cuDeviceGet")
    context = _check(driver.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
    _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    return context


def _loaded(driver: Any, device: int | None) -> _LoadedKernel:
    context = _current_context(driver, device)
    with _LOCK:
        loaded = _LOADED.get(int(context))
        if loaded is not None:
            return loaded
        ordinal = _check(driver.cuCtxGetDevice(), "cuCtxGetDevice")
        attribute = driver.CUdevice_attribute
        major = _check(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, ordinal),
                       "cuDeviceGetAttribute")
        minor = _check(driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, ordinal),
                       "cuDeviceGetAttribute")
        if major < 8:
            raise QVGGTError(f"the fused Hadamard kernel needs compute capability 8.0 or newer (bf16 conversions); "
                             f"this GPU is {major}.{minor}")
        cubin = compile_kernel_source(f"sm_{major}{minor}")
        module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        functions = {}
        for schedule in ("simple", "tiled"):
            for suffix in DTYPE_CODES.values():
                name = f"qvggt_hadamard_{schedule}_{suffix}"
                functions[name] = _check(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
        loaded = _LoadedKernel(module, functions, {})
        _LOADED[int(context)] = loaded
        logger.debug("loaded the fused Hadamard kernel for sm_%d%d", major, minor)
        return loaded


def _factor_pointer(driver: Any, loaded: _LoadedKernel, m: int) -> int:
    """Device copy of the +-1 Paley factor H_m (int8, row-major), made once per context."""
    with _LOCK:
        if m not in loaded.factors:
            import torch  # only for the rare sizes with a Paley factor

            from qvggt_export.quant.hadamard import integer_hadamard

            matrix = integer_hadamard(m).to(dtype=torch.int8).contiguous().numpy().tobytes()
            pointer = _check(driver.cuMemAlloc(len(matrix)), "cuMemAlloc")
            _check(driver.cuMemcpyHtoD(pointer, matrix, len(matrix)), "cuMemcpyHtoD")
            loaded.factors[m] = int(pointer)
        return loaded.factors[m]


def resolve_schedule(d: int, m: int, schedule: str = "auto") -> str:
    """The schedule the kernel runs for size ``d = 2^k * m`` (``csrc/hadamard_kernel.h``: hadamard_schedule)."""
    if schedule not in SCHEDULES:
        raise QVGGTError(f"unknown Hadamard kernel schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    tiled_ok = m == 1 and d >= TILED_MIN_SIZE
    if schedule == "tiled" and not tiled_ok:
        raise QVGGTError(f"the tiled Hadamard schedule needs d = 2^k >= {TILED_MIN_SIZE}, got d = {d} (m = {m})")
    if schedule == "auto":
        return "tiled" if tiled_ok else "simple"
    return schedule


def launch_hadamard(x: int, y: int, rows: int, d: int, dtype: str, pre: int = 0, post: int = 0, stream: int = 0, *,
                    device: int | None = None, schedule: str = "auto") -> None:
    """``y = ((x * pre) @ H) * post`` on the GPU, row by row, enqueued on ``stream`` (asynchronous).

    Args:
        x, y: device pointers to ``rows x d`` contiguous elements of ``dtype`` (``y`` may equal ``x``).
        rows: number of rows (tokens).
        d: transform size (``2^k * m`` as :func:`qvggt_export.quant.hadamard.hadamard_factors` splits it, <= 8192).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        pre, post: device pointers to fp32 ``[d]`` vectors, or 0 for all ones.
        stream: a ``cudaStream_t`` / ``CUstream`` handle as an integer (0: the legacy default stream).
        device: the device ordinal to use when no CUDA context is current (TensorRT's and PyTorch's are).
        schedule: ``"auto"``, ``"simple"`` or ``"tiled"`` (``csrc/hadamard_kernel.h``).

    Raises:
        MissingDependencyError: cuda-python is not installed.
        QVGGTError: unsupported size, dtype or schedule, no GPU, or a CUDA error.
    """
    from qvggt_export.quant.hadamard import hadamard_factors

    if dtype not in DTYPE_CODES:
        raise QVGGTError(f"the Hadamard kernel stores float32, float16 or bfloat16, not {dtype}")
    if d > MAX_SIZE:
        raise QVGGTError(f"the Hadamard kernel supports d <= {MAX_SIZE} (shared memory), got {d}")
    power, m = hadamard_factors(d)
    chosen = resolve_schedule(d, m, schedule)
    if rows <= 0:
        return
    driver, _ = _bindings()
    loaded = _loaded(driver, device)
    function = loaded.functions[f"qvggt_hadamard_{chosen}_{DTYPE_CODES[dtype]}"]
    scale = 1.0 / math.sqrt(d)
    element = 4 if dtype == "float32" else 2
    hm = _factor_pointer(driver, loaded, m) if m > 1 else 0
    for start in range(0, rows, _MAX_GRID):
        count = min(rows - start, _MAX_GRID)
        xs, ys = x + start * d * element, y + start * d * element
        if chosen == "tiled":
            args = ((xs, ys, int(math.log2(d)), pre, post, scale),
                    (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float))
            threads, shared_floats = d // TILE, d + d // 32  # tiled_shared_floats: one pad float per 32
        else:
            args = ((xs, ys, d, m, hm, pre, post, scale),
                    (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_float))
            threads, shared_floats = min(max(d // 2, 32), SIMPLE_MAX_THREADS), d
        _check(driver.cuLaunchKernel(function, count, 1, 1, threads, 1, 1, shared_floats * 4, driver.CUstream(stream),
                                     args, 0),
               "cuLaunchKernel (Hadamard)")


def hadamard_cuda(x: Any, signs: Any = None, post_scale: Any = None, out: Any = None, schedule: str = "auto") -> Any:
    """:func:`~qvggt_export.quant.hadamard.fwht` with the fused kernel, for CUDA tensors, on PyTorch's current stream.

    Args:
        x: CUDA tensor ``[..., d]`` (float32, float16 or bfloat16); made contiguous if it is not.
        signs, post_scale: optional ``[d]`` scales (cast to contiguous fp32 on x's device).
        out: optional output tensor (same shape/dtype/device as ``x``, contiguous; may be ``x``).
        schedule: as in :func:`launch_hadamard`.

    Returns:
        ``((x * signs) @ H) * post_scale`` in x's dtype.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        raise QVGGTError("hadamard_cuda takes a CUDA tensor; use qvggt_export.quant.hadamard.fwht on the CPU")
    dtype = str(x.dtype).removeprefix("torch.")
    x = x.contiguous()
    d = int(x.shape[-1])
    out = torch.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise QVGGTError("hadamard_cuda: out must be a contiguous tensor of x's shape, dtype and device")

    def vector(v: Any) -> Any:
        if v is None:
            return None
        v = v.to(device=x.device, dtype=torch.float32).contiguous()
        if v.shape != (d,):
            raise QVGGTError(f"hadamard_cuda: scales must have shape [{d}], got {list(v.shape)}")
        return v

    pre, post = vector(signs), vector(post_scale)
    with torch.cuda.device(x.device):
        launch_hadamard(x.data_ptr(), out.data_ptr(), x.numel() // d if d else 0, d, dtype,
                        pre.data_ptr() if pre is not None else 0, post.data_ptr() if post is not None else 0,
                        torch.cuda.current_stream(x.device).cuda_stream, device=x.device.index, schedule=schedule)
    return out
