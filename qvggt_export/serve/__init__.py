"""Serving stage: answer KServe v2 / Triton HTTP inference requests with an engine, ONNX Runtime or PyTorch.

Depends on the engine runtime, ONNX Runtime and the model only (never on quantization or export code)::

    from qvggt_export.serve import ServeConfig, serve

    serve(ServeConfig("out/w4a4", runtime="onnxruntime", port=8000))   # blocks; Ctrl-C stops it gracefully

Starlette and uvicorn (extra ``serve``) are imported when a server is built, not when this package is.
"""

from qvggt_export.serve.backends import RUNTIMES, open_backend
from qvggt_export.serve.protocol import ModelSignature, ProtocolError, TensorMetadata
from qvggt_export.serve.server import ServeConfig, build_server, serve

__all__ = ["RUNTIMES", "ModelSignature", "ProtocolError", "ServeConfig", "TensorMetadata", "build_server",
           "open_backend", "serve"]
