"""The KServe v2 / Triton HTTP inference protocol as pure functions: bytes in, arrays out, and back.

Nothing here knows HTTP frameworks or runtimes: :func:`parse_infer_request` turns a request body into a checked
image batch (or raises :class:`ProtocolError` with the HTTP status and a message that says what is wrong), and
:func:`encode_infer_response` turns output arrays into a response body. Both follow the protocol as Triton
implements it (https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md and Triton's
binary tensor data extension), so Triton's own client (``tritonclient.http``) works against this server:

* JSON tensors: ``{"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name"}]}``, ``data`` a
  row-major flat (or nested) list.
* Binary tensors: the header ``Inference-Header-Content-Length: N`` says the body's first N bytes are the JSON
  request and the rest the inputs' raw little-endian bytes, each input giving its length in
  ``parameters.binary_data_size``. Outputs come back binary when the request asks for it per output
  (``parameters.binary_data``) or for all (``parameters.binary_data_output``); tritonclient does both by default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qvggt_export.errors import QVGGTError

__all__ = [
    "HEADER_LENGTH",
    "DATATYPES",
    "InferRequest",
    "ModelSignature",
    "ProtocolError",
    "TensorMetadata",
    "encode_infer_response",
    "parse_infer_request",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
# KServe v2 datatype names of the numpy dtypes VGGT graphs use.
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64",
             np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL"}


class ProtocolError(QVGGTError):
    """A request the server refuses: ``status`` is the HTTP status (4xx), the message says what is wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as the model metadata endpoint lists it (``-1`` marks a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    """What a served model takes and returns.

    Attributes:
        input: The image input, ``[1, -1, 3, H, W]`` FP32.
        outputs: The outputs (``pose_enc``, ``depth``, ...).
        frames: ``(min, max)`` frames per request (an engine's optimization profile, else the server's limit).
    """

    input: TensorMetadata
    outputs: tuple[TensorMetadata, ...]
    frames: tuple[int, int]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.input.shape[-2], self.input.shape[-1]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


@dataclass(frozen=True)
class InferRequest:
    """A checked request: the images ``[1, S, 3, H, W]`` float32, the outputs to return and how."""

    images: np.ndarray
    outputs: tuple[str, ...]
    binary_outputs: frozenset[str]
    id: str | None = None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes (truncated body?)")
    return body[:length], body[length:]


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"input shape must be a list of integers, got {value!r}")
    if any(d < 0 for d in value):
        raise ProtocolError(f"input shape {value} has a negative dimension")
    return tuple(value)


def _decode_input(entry: dict[str, Any], binary: bytes, offset: int, signature: ModelSignature,
                  ) -> tuple[np.ndarray, int]:
    """The input's array (float32, in the request's shape) and the binary offset after it."""
    name = signature.input.name
    datatype = entry.get("datatype")
    if datatype != signature.input.datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype!r}; the model takes {signature.input.datatype} "
                            "(float32 images in [0, 1])")
    shape = _shape(entry.get("shape"))
    count = math.prod(shape)
    parameters = _object(entry.get("parameters", {}), f"parameters of input {name!r}")
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise ProtocolError(f"input {name!r} has both 'data' and parameters.binary_data_size")
        expected = count * 4
        if not isinstance(size, int) or size != expected:
            raise ProtocolError(f"input {name!r}: binary_data_size is {size!r} but shape {list(shape)} of FP32 "
                                f"needs {expected} bytes")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: {size} bytes of binary data announced, {len(binary) - offset} "
                                "received (truncated body?)")
        array = np.frombuffer(binary, dtype="<f4", count=count, offset=offset).reshape(shape)
        return array.astype(np.float32, copy=False), offset + size
    if "data" not in entry:
        raise ProtocolError(f"input {name!r} has no 'data' (and no parameters.binary_data_size)")
    try:
        array = np.asarray(entry["data"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"input {name!r}: data is not a list of numbers ({exc})") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} values, data has {array.size}")
    return array.reshape(shape), offset


def _check_images_shape(name: str, shape: tuple[int, ...], signature: ModelSignature) -> None:
    height, width = signature.resolution
    low, high = signature.frames
    expected = f"[S, 3, {height}, {width}] or [1, S, 3, {height}, {width}] with {low} <= S <= {high}"
    full = (1, *shape) if len(shape) == 4 else shape
    if len(full) != 5 or full[0] != 1 or full[2] != 3:
        raise ProtocolError(f"input {name!r} has shape {list(shape)}; the model takes {expected} (one sequence of "
                            "RGB frames per request)")
    if (full[3], full[4]) != (height, width):
        raise ProtocolError(f"input {name!r} has frames of {full[3]}x{full[4]} (H x W); the model takes "
                            f"{height}x{width} only: preprocess the images as the export did "
                            "(qvggt_export.model.preprocess)")
    if not low <= full[1] <= high:
        raise ProtocolError(f"input {name!r} has {full[1]} frames; this model takes {low} to {high} per request")


def parse_infer_request(body: bytes, header_length: str | None, signature: ModelSignature) -> InferRequest:
    """Parse and check one ``POST /v2/models/{name}/infer`` body.

    Args:
        body: The whole request body.
        header_length: The ``Inference-Header-Content-Length`` header (binary tensor extension), or ``None``.
        signature: What the model takes (input name, datatype, resolution, frame range) and returns.

    Raises:
        ProtocolError: Status 400 with a message naming the problem: not JSON, wrong structure, unknown input or
            output, datatype other than FP32, shape or resolution not the model's, frame count outside
            ``signature.frames``, data length not matching the shape, non-finite values.
    """
    header, binary = _split_body(body, header_length)
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"request body is not valid JSON ({exc}); send a KServe v2 inference request "
                            '{"inputs": [{"name", "shape", "datatype", "data"}]}') from None
    request = _object(request, "the inference request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the inference request has no 'inputs' list")
    name = signature.input.name
    entries = [_object(entry, "each input") for entry in inputs]
    names = [entry.get("name") for entry in entries]
    if names != [name]:
        raise ProtocolError(f"the request's inputs are {names}; the model takes one input, {name!r}")
    images, used = _decode_input(entries[0], binary, 0, signature)
    if used != len(binary):
        raise ProtocolError(f"the body has {len(binary) - used} bytes of binary data beyond the inputs' "
                            "binary_data_size")
    _check_images_shape(name, images.shape, signature)
    if not np.isfinite(images).all():
        raise ProtocolError(f"input {name!r} holds NaN or infinite values")
    images = images.reshape(1, *images.shape[-4:]) if images.ndim == 4 else images

    parameters = _object(request.get("parameters", {}), "request parameters")
    all_binary = bool(parameters.get("binary_data_output", False))
    requested = request.get("outputs")
    if requested is None:
        outputs, binary_outputs = signature.output_names, set(signature.output_names) if all_binary else set()
    else:
        if not isinstance(requested, list):
            raise ProtocolError("'outputs' must be a list of {\"name\": ...} objects")
        outputs, binary_outputs = [], set()
        for entry in requested:
            entry = _object(entry, "each requested output")
            output = entry.get("name")
            if output not in signature.output_names:
                raise ProtocolError(f"unknown output {output!r}; the model's outputs are "
                                    f"{list(signature.output_names)}")
            outputs.append(output)
            output_parameters = _object(entry.get("parameters", {}), f"parameters of output {output!r}")
            if output_parameters.get("binary_data", all_binary):
                binary_outputs.add(output)
        outputs = tuple(outputs)
    request_id = request.get("id")
    return InferRequest(images=np.ascontiguousarray(images), outputs=tuple(outputs),
                        binary_outputs=frozenset(binary_outputs),
                        id=str(request_id) if request_id is not None else None)


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          results: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers for ``results`` (only the outputs the request asked for).

    JSON outputs carry ``data`` as a flat row-major list; binary outputs carry ``parameters.binary_data_size`` and
    follow the JSON header in the body, in order, with ``Inference-Header-Content-Length`` giving its length.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in request.outputs:
        array = np.ascontiguousarray(results[name])
        datatype = DATATYPES.get(array.dtype)
        if datatype is None:
            raise QVGGTError(f"output {name!r} has dtype {array.dtype}, which this server cannot send")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def signature_from_onnx_io(input_name: str, input_shape: Sequence[int | str | None],
                           outputs: Sequence[tuple[str, Sequence[int | str | None]]], frames: tuple[int, int],
                           ) -> ModelSignature:
    """A signature from ONNX-style I/O declarations (symbolic or unknown dimensions become ``-1``)."""

    def dims(shape: Sequence[int | str | None]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)

    image_dims = dims(input_shape)
    if len(image_dims) != 5 or image_dims[2] != 3 or image_dims[3] < 1 or image_dims[4] < 1:
        raise QVGGTError(f"model input {input_name!r} has shape {list(input_shape)}; expected [1, S, 3, H, W] with "
                         "a fixed H and W")
    return ModelSignature(input=TensorMetadata(input_name, "FP32", (1, -1, *image_dims[2:])),
                          outputs=tuple(TensorMetadata(name, "FP32", dims(shape)) for name, shape in outputs),
                          frames=frames)
