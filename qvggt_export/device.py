"""Where the calibration runs: device choice, reduced-precision statistics passes and out-of-memory errors.

Device choice is a config field passed down (``PipelineConfig.device``), never a global: ``"auto"`` (CUDA when
PyTorch sees a GPU, else the CPU), ``"cpu"``, ``"cuda"`` (the current CUDA device) or ``"cuda:N"``.

What runs on the chosen device: the model's float and fake-quantized forwards of calibration (NFDS statistics,
DSFQ statistics, block reconstruction, the quantized-vs-float output error). What always runs on the CPU: saving
the quantized state, the ONNX export (the exported tensors are moved to the CPU first) and parity (ONNX Runtime
CPU against the PyTorch model on the CPU), so the exported graph is the same function of the calibrated
parameters whatever device calibrated them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from qvggt_export.errors import QVGGTError

__all__ = ["CALIB_DTYPES", "DEVICE_CHOICES", "autocast", "check_device_spec", "out_of_memory_guard", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
#: Precision of the float passes that only gather statistics (NFDS, DSFQ channel maxima). ``fp32`` is the default
#: (exact statistics; the same selection as on the CPU); ``bf16`` / ``fp16`` autocast those passes on CUDA.
CALIB_DTYPES = ("fp32", "bf16", "fp16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(:\d+)?$")


def check_device_spec(spec: str) -> str:
    """Validate a device string's form (no CUDA query: cheap, for config construction)."""
    if not isinstance(spec, str) or not _DEVICE_PATTERN.match(spec) or spec.startswith(("auto:", "cpu:")):
        raise QVGGTError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {spec!r}")
    return spec


def resolve_device(spec: str = "auto") -> Any:
    """The ``torch.device`` for ``spec``, checked against what this machine has.

    Raises:
        QVGGTError: a malformed spec, CUDA asked for where PyTorch sees no GPU (a CPU build of torch, or no
            driver), or a device index beyond the GPUs present.
    """
    import torch

    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build of PyTorch" if torch.version.cuda is None else f"PyTorch {torch.__version__}"
        raise QVGGTError(f"--device {spec}: no CUDA GPU is visible to {build}; use --device cpu (or auto)")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise QVGGTError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def autocast(device: Any, calib_dtype: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for a statistics-only float pass: a no-op for ``fp32``; ``bf16``/``fp16`` on CUDA only.

    Raises:
        QVGGTError: an unknown dtype, or a reduced dtype asked for on the CPU.
    """
    import torch

    if calib_dtype not in CALIB_DTYPES:
        raise QVGGTError(f"calib_dtype must be one of {', '.join(CALIB_DTYPES)}, got {calib_dtype!r}")
    if calib_dtype == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise QVGGTError(f"--calib-dtype {calib_dtype} applies to CUDA runs; the CPU calibrates in fp32")
    return torch.autocast("cuda", dtype=torch.bfloat16 if calib_dtype == "bf16" else torch.float16)


@contextlib.contextmanager
def out_of_memory_guard(stage: str, device: Any, knobs: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error inside ``stage`` into one :class:`QVGGTError` line naming what to turn.

    Args:
        stage: what was running (``"NFDS statistics"``).
        device: the ``torch.device`` it ran on.
        knobs: the options that reduce that stage's memory (``"--frames, --nfds-batch or --calib-dtype bf16"``).
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        total = ""
        if device.type == "cuda":
            total_bytes = torch.cuda.get_device_properties(device).total_memory
            peak = torch.cuda.max_memory_allocated(device)
            total = f" ({total_bytes / 2**30:.1f} GiB card, {peak / 2**30:.1f} GiB at the peak)"
            torch.cuda.empty_cache()
        raise QVGGTError(f"out of memory on {device}{total} during {stage}; reduce {knobs}, or run on a larger "
                         "GPU") from exc
