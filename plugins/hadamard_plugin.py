"""Python ``IPluginV3`` for the Hadamard op (DESIGN.md section 4), for TensorRT-RTX and full TensorRT.

The plugin implements the contract of the ``"plugin"`` form of :mod:`qvggt_export.export.hadamard_onnx`:

* creator name ``Hadamard``, version ``"1"``, namespace ``"qvggt"``; one field, ``size`` (int ``d``);
* inputs ``x`` ``[..., d]`` (FP32, FP16 or BF16; any rank >= 1; ``d`` static and equal to ``size``),
  ``pre`` and ``post`` ``[d]``: float32 (what the exporter writes) or the dtype of ``x`` (a model converted
  to half as a whole); the scales are applied in fp32 either way;
* output ``y = ((x * pre) @ H) * post``, shape and dtype of ``x``; ``H`` the normalised
  ``kron(H_{2^k}, H_m)`` of :func:`qvggt_export.quant.hadamard.hadamard_matrix`; linear formats only.

TensorRT reaches a Python ``IPluginV3`` only through the ONNX parser: the parser maps the node's op type,
``plugin_version`` and ``plugin_namespace`` attributes to a registered creator and hands the other
attributes (``size``) to :meth:`create_plugin` as fields. At build time TensorRT calls only the shape, type,
format, configuration, workspace, tactic and serialization methods below; it never enqueues (so a
CPU-only TensorRT-RTX build never needs a GPU). The engine stores the name, version, namespace and fields,
not Python code: the process that runs the engine must call :func:`qvggt_export.plugins.register` (or
provide a C++ creator with the same identity, see ``plugins/README.md``) before deserializing it.

Both TensorRT flavours expose the same Python plugin API; the classes are built once per imported module
by :func:`plugin_classes`, so this module itself imports neither.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from types import ModuleType
from typing import Any

import numpy as np

from qvggt_export.errors import QVGGTError

__all__ = [
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "SIZE_FIELD",
    "plugin_classes",
]

logger = logging.getLogger(__name__)

# Must equal qvggt_export.export.hadamard_onnx.{HADAMARD_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE}; a test checks it
# (importing the exporter here would pull onnx into every runtime that only deserializes engines).
PLUGIN_NAME = "Hadamard"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "qvggt"
SIZE_FIELD = "size"

_NUM_INPUTS = 3  # x, pre, post
_X, _PRE, _POST, _Y = 0, 1, 2, 3  # positions in supports_format_combination's in_out list


def _size_from_fields(fields: Any) -> int:
    """``d`` from a PluginFieldCollection (ONNX int attributes arrive as INT32 or INT64 fields)."""
    for field in fields or ():
        if field.name == SIZE_FIELD:
            data = np.asarray(field.data).reshape(-1)
            if data.size != 1:
                raise QVGGTError(f"Hadamard plugin field {SIZE_FIELD!r} must hold one integer, got {data.tolist()}")
            return int(data[0])
    raise QVGGTError(f"Hadamard plugin needs the field {SIZE_FIELD!r} (the ONNX node's 'size' attribute)")


def _check_size(size: int) -> int:
    from qvggt_export.quant.hadamard import hadamard_factors  # imports torch: only when a plugin is created

    hadamard_factors(size)  # raises QVGGTError with the supported sizes
    return size


@functools.cache
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The ``(plugin, creator)`` classes bound to an imported TensorRT module (``tensorrt_rtx`` or ``tensorrt``).

    Cached per module, so registering twice reuses the same classes.
    """
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF) + ((trt.DataType.BF16,) if hasattr(trt.DataType, "BF16")
                                                              else ())

    class HadamardPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """One Hadamard layer; ``size`` is its ``d`` (module docstring)."""

        def __init__(self, size: int, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = 1
            # All instances of one size share timings (there is only the default tactic anyway).
            self.timing_cache_id = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}_{size}"
            self.size = size
            self.phase = phase
            self._device_state: dict[str, Any] = {}  # per-device constants built by enqueue (GPU only)

        # --- IPluginV3 / OneCore -------------------------------------------------------------------------
        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> Any:
            cloned = HadamardPlugin(self.size, self.phase)
            cloned.__dict__.update(self.__dict__)
            # The pybind properties are not in __dict__: copy them explicitly (DESIGN.md section 4).
            cloned.plugin_namespace = self.plugin_namespace
            cloned.timing_cache_id = self.timing_cache_id
            cloned._device_state = {}
            return cloned

        # --- OneBuild (all TensorRT calls while building; no GPU involved) ----------------------------------
        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[_X]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], expr_builder: Any) -> list[Any]:
            return [trt.DimsExprs(inputs[_X])]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            x_type = in_out[_X].desc.type
            if pos == _X:
                return desc.type in float_types
            if pos in (_PRE, _POST):
                # float32 is what the exporter writes; x's own dtype covers models converted to half as a whole.
                return desc.type in (trt.DataType.FLOAT, x_type)
            return desc.type == x_type  # the output

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            if len(inputs) != _NUM_INPUTS:
                raise QVGGTError(f"Hadamard plugin takes 3 inputs (x, pre, post), got {len(inputs)}")
            x = inputs[_X]
            if len(x.desc.dims) < 1:
                raise QVGGTError("Hadamard plugin input x needs rank >= 1")
            # Every profile bound must agree on the last axis: the transform size is baked into the layer.
            last = {int(dims[len(dims) - 1]) for dims in (x.min, x.max, x.desc.dims) if len(dims) > 0}
            last.discard(-1)
            if last and last != {self.size}:
                raise QVGGTError(f"Hadamard plugin of size {self.size} got x with last dimension(s) {sorted(last)}; "
                                 "the last axis must be static and equal to the node's 'size' attribute")
            for index, name in ((_PRE, "pre"), (_POST, "post")):
                dims = tuple(inputs[index].desc.dims)
                if dims not in ((self.size,), (-1,)):
                    raise QVGGTError(f"Hadamard plugin input {name} must have shape [{self.size}], got {list(dims)}")

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []  # only the default tactic

        # --- OneRuntime ------------------------------------------------------------------------------------
        def set_tactic(self, tactic: int) -> None:
            pass

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection([
                trt.PluginField(SIZE_FIELD, np.array([self.size], dtype=np.int32), trt.PluginFieldType.INT32),
            ])

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int], outputs: list[int],
                    workspace: int, stream: int) -> None:
            # Runs only at inference time on a GPU (TensorRT never enqueues while building): the fused CUDA kernel
            # of plugins/csrc on TensorRT's buffers and stream by default, or the PyTorch fwht (see _enqueue).
            _enqueue(self, trt, input_desc, output_desc, inputs, outputs, stream)

    class HadamardPluginCreator(trt.IPluginCreatorV3One):
        """Creator ``qvggt::Hadamard`` version 1, field ``size``."""

        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(SIZE_FIELD, np.array([], dtype=np.int32), trt.PluginFieldType.INT32),
            ])

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
            # Errors raised here reach the ONNX parser / runtime as a failed creation, with this message logged.
            return HadamardPlugin(_check_size(_size_from_fields(fields)), phase)

    return HadamardPlugin, HadamardPluginCreator


# ---------------------------------------------------------------------------------------------------------------------
# GPU execution (not executed in CI: needs a CUDA GPU).

#: Environment variable choosing the enqueue implementation: "kernel" (default: the fused CUDA kernel through
#: qvggt_export.plugins.hadamard_cuda) or "torch" (the reference fwht run by a CUDA build of PyTorch).
ENQUEUE_ENV = "QVGGT_PLUGIN_HADAMARD"
ENQUEUE_CHOICES = ("kernel", "torch")
_KERNEL_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}
_warned: set[str] = set()


def enqueue_choice() -> str:
    """The enqueue implementation selected by ``$QVGGT_PLUGIN_HADAMARD`` (default ``"kernel"``)."""
    choice = os.environ.get(ENQUEUE_ENV, "kernel").strip().lower() or "kernel"
    if choice not in ENQUEUE_CHOICES:
        raise QVGGTError(f"{ENQUEUE_ENV}={choice!r}: choose one of {', '.join(ENQUEUE_CHOICES)}")
    return choice


def _kernel_obstacle(input_desc: list[Any]) -> str | None:
    """Why the fused kernel cannot take this call (the PyTorch path then does), or ``None``."""
    from qvggt_export.plugins.hadamard_cuda import kernel_unavailable_reason

    if any(input_desc[i].type.name != "FLOAT" for i in (_PRE, _POST)):
        return "the fused kernel takes fp32 pre/post scales; this engine stores them in half precision"
    return kernel_unavailable_reason()


def _enqueue(plugin: Any, trt: ModuleType, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
             outputs: list[int], stream: int) -> None:
    if enqueue_choice() == "kernel":
        obstacle = _kernel_obstacle(input_desc)
        if obstacle is None:
            _enqueue_kernel(plugin, input_desc, inputs, outputs, stream)
            return
        if obstacle not in _warned:  # once per reason: enqueue runs for every layer of every inference
            _warned.add(obstacle)
            logger.warning("Hadamard plugin: using the PyTorch fwht instead of the fused kernel: %s", obstacle)
    _enqueue_torch(plugin, trt, input_desc, output_desc, inputs, outputs, stream)


def _enqueue_kernel(plugin: Any, input_desc: list[Any], inputs: list[int], outputs: list[int], stream: int) -> None:
    """The fused kernel on TensorRT's pointers and stream (no PyTorch involved)."""
    from qvggt_export.plugins.hadamard_cuda import launch_hadamard

    d = plugin.size
    shape = tuple(int(v) for v in input_desc[_X].dims)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    name = input_desc[_X].type.name
    if name not in _KERNEL_DTYPES:
        raise QVGGTError(f"Hadamard plugin: unsupported tensor type {name}")
    try:
        launch_hadamard(int(inputs[_X]), int(outputs[0]), rows, d, _KERNEL_DTYPES[name], int(inputs[_PRE]),
                        int(inputs[_POST]), int(stream))
    except (OSError, RuntimeError) as exc:  # e.g. no CUDA driver library: cuda-python raises these
        raise QVGGTError(f"Hadamard plugin: the CUDA kernel could not run: {exc}") from exc

_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "BF16": "<i2"}  # BF16 has no array-interface code: viewed from int16


class _CudaBuffer:
    """A raw device pointer described by ``__cuda_array_interface__`` (v3), which ``torch.as_tensor`` wraps
    without copying."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (int(pointer), False),
                                         "version": 3, "strides": None, "stream": None}


def _wrap(pointer: int, shape: tuple[int, ...], dtype: Any) -> Any:
    import torch

    name = dtype.name
    if name not in _TYPESTR:
        raise QVGGTError(f"Hadamard plugin: unsupported tensor type {name}")
    tensor = torch.as_tensor(_CudaBuffer(pointer, shape, _TYPESTR[name]), device="cuda")
    return tensor.view(torch.bfloat16) if name == "BF16" else tensor


def _enqueue_torch(plugin: Any, trt: ModuleType, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                   outputs: list[int], stream: int) -> None:
    """``y = fwht(x, pre, post)`` on TensorRT's device buffers, ordered on TensorRT's stream."""
    import torch

    from qvggt_export.quant.hadamard import fwht

    if not torch.cuda.is_available():
        raise QVGGTError("the Hadamard plugin's Python enqueue needs a CUDA build of PyTorch and a CUDA GPU")
    d = plugin.size
    shape = tuple(int(v) for v in input_desc[_X].dims)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if rows == 0:
        return
    x = _wrap(inputs[_X], (rows, d), input_desc[_X].type)
    y = _wrap(outputs[0], (rows, d), output_desc[0].type)
    # Every kernel (casts, fwht's matmuls, the copy) goes on TensorRT's stream, so it is ordered with the layers
    # around this one; nothing here synchronizes.
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream), device=x.device)):
        pre = _wrap(inputs[_PRE], (d,), input_desc[_PRE].type).float()
        post = _wrap(inputs[_POST], (d,), input_desc[_POST].type).float()
        y.copy_(fwht(x, signs=pre, post_scale=post))
