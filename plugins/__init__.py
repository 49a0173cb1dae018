"""The Hadamard op: kernels, TensorRT plugin, ONNX Runtime counterpart (installed as ``qvggt_export.plugins``)."""
