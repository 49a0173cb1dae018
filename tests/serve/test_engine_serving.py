"""``qvggt-export serve`` with the engine backend (GPU only: skipped with a reason elsewhere; NOT run in this
project's CI, which has no GPU).

Builds the float tiny VGGT for this machine's GPU (TensorRT-RTX when it targets the GPU, else full TensorRT; frames
1..4), serves it on loopback and compares the answer with ONNX Runtime on the same graph; a request with more
frames than the profile takes gets a 400 that names the range.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx", reason="httpx is in the dev extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install 'qvggt-export[serve]')")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="serving an engine needs a CUDA GPU (none visible)")]


def _backend_for_this_gpu() -> str:
    major, minor = torch.cuda.get_device_capability(0)
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        from qvggt_export.engine import load_backend

        if f"SM{major}{minor}" in load_backend("rtx").compute_capability_names():
            return "rtx"
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip(f"neither TensorRT-RTX for SM{major}{minor} nor full TensorRT is installed")
    return "trt"


def test_engine_backend_serves_what_onnxruntime_computes(tmp_path: Path) -> None:
    from qvggt_export.engine import EngineProfile, FrameRange, build_engine
    from qvggt_export.serve import ServeConfig, build_server
    from qvggt_export.serve.backends import EngineBackend
    from tests.engine.test_runtime import SIZE, tiny_vggt_onnx

    onnx_path = tiny_vggt_onnx(tmp_path / "tiny.onnx")
    profile = EngineProfile(name="serve-test", backend=_backend_for_this_gpu(), compute_capabilities=("CURRENT",),
                            frames=FrameRange(1, 2, 4))
    engine = build_engine(onnx_path, tmp_path / "tiny.engine", profile).engine_path
    backend = EngineBackend(engine)
    assert backend.signature.frames == (1, 4) and backend.signature.resolution == (SIZE, SIZE)

    images = np.random.default_rng(0).random((1, 2, 3, SIZE, SIZE), dtype=np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(names, {"images": images}), strict=True))

    server = build_server(ServeConfig(engine, port=0), backend=backend)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}
        response = httpx.post(f"{url}/v2/models/vggt/infer", json=body, timeout=120)
        assert response.status_code == 200, response.text
        for output in response.json()["outputs"]:
            got = np.asarray(output["data"], np.float32).reshape(output["shape"])
            np.testing.assert_allclose(got, reference[output["name"]], rtol=1e-5, atol=1e-6, err_msg=output["name"])
        too_many = np.zeros((1, 5, 3, SIZE, SIZE), np.float32)
        body["inputs"][0].update(shape=list(too_many.shape), data=too_many.ravel().tolist())
        refused = httpx.post(f"{url}/v2/models/vggt/infer", json=body, timeout=120)
        assert refused.status_code == 400 and "takes 1 to 4" in refused.json()["error"]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
