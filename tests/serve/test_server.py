"""``qvggt-export serve`` on loopback with the ONNX Runtime backend, on an export the pipeline makes of ``tiny``.

Real photos (../shared/data) answered within the parity tolerances of the PyTorch fake-quant model; malformed
requests answered 4xx with a message while the server keeps serving; a bounded load test through Triton's own
HTTP client loses no request; a full server sheds load with 503; shutdown lets a request in flight finish.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_shared_data

httpx = pytest.importorskip("httpx", reason="httpx is in the dev extra (pip install 'qvggt-export[dev]')")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install 'qvggt-export[serve]')")
pytest.importorskip("starlette", reason="the server needs the serve extra (pip install 'qvggt-export[serve]')")

from qvggt_export.serve import ModelSignature, ServeConfig, TensorMetadata, build_server  # noqa: E402
from qvggt_export.serve.backends import OnnxRuntimeBackend  # noqa: E402

MAX_FRAMES = 4
MAX_BODY_MB = 4.0
pytestmark = pytest.mark.slow  # the module's export takes ~30-50 s on 2 shared cores


class RunningServer:
    """A uvicorn server in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, config: ServeConfig, backend: object) -> None:
        self.server = build_server(config, backend=backend)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGINT / SIGTERM handler does
        self.thread.join(timeout=60)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.sock.close()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qvggt_export.pipeline import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("serve") / "w8a8"
    report = run_pipeline(PipelineConfig(out_dir=out, bits="w8a8", engine=False, progress=False, calib_size=2,
                                         calib_pool=4, frames=2))
    assert report["parity"]["passed"]
    return out


@pytest.fixture(scope="module")
def server(export_dir: Path):
    config = ServeConfig(export_dir, runtime="onnxruntime", port=0, max_frames=MAX_FRAMES, max_concurrency=2,
                         max_queue=16, max_body_mb=MAX_BODY_MB)
    backend = OnnxRuntimeBackend(export_dir / "model.onnx", MAX_FRAMES)
    with RunningServer(config, backend) as running:
        yield running


def _json_request(images: np.ndarray, datatype: str = "FP32", name: str = "images") -> dict:
    return {"inputs": [{"name": name, "shape": list(images.shape), "datatype": datatype,
                        "data": images.ravel().tolist()}]}


def _outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    body = response.json()
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in body["outputs"]}


def _random_images(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, frames, 3, 70, 70), dtype=np.float32)


def _assert_serving(server: RunningServer) -> None:
    """A valid request still gets 200 with every output."""
    response = httpx.post(f"{server.url}/v2/models/vggt/infer", json=_json_request(_random_images(1)), timeout=60)
    assert set(_outputs(response)) == {"pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"}


def test_health_and_metadata(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/vggt/ready").status_code == 200
    metadata = httpx.get(f"{server.url}/v2/models/vggt").json()
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [1, -1, 3, 70, 70]}]
    assert [o["name"] for o in metadata["outputs"]] == ["pose_enc", "depth", "depth_conf", "world_points",
                                                         "world_points_conf"]
    assert (metadata["parameters"]["frames_min"], metadata["parameters"]["frames_max"]) == (1, MAX_FRAMES)
    missing = httpx.get(f"{server.url}/v2/models/other")
    assert missing.status_code == 404 and "'other'" in missing.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/vggt/versions/2/ready").status_code == 404


def test_real_images_match_pytorch_within_parity_tolerance(server: RunningServer, export_dir: Path) -> None:
    """Real photos, preprocessed as the export (pad to the graph's square 70 px), through JSON tensors and
    through Triton's client (binary tensors), against the PyTorch fake-quant model under the parity criterion."""
    import torch
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    from qvggt_export.model import build_vggt
    from qvggt_export.model.preprocess import load_and_preprocess_images
    from qvggt_export.parity.compare import tolerance_for
    from qvggt_export.parity.metrics import output_metrics
    from qvggt_export.quant.state import load_quantized

    paths = sorted((require_shared_data() / "sequences" / "kitchen").glob("*.jpg"))[:3]
    images = load_and_preprocess_images(paths, "pad", target_size=70, patch_size=14).unsqueeze(0)
    assert tuple(images.shape) == (1, 3, 3, 70, 70)
    quantized, _ = load_quantized(export_dir / "quantized_model.json")
    float_model = build_vggt("tiny", seed=0)
    with torch.no_grad():
        reference = {k: v.numpy() for k, v in quantized(images).items() if isinstance(v, torch.Tensor)}
        float_out = {k: v.numpy() for k, v in float_model(images).items() if isinstance(v, torch.Tensor)}

    served_json = _outputs(httpx.post(f"{server.url}/v2/models/vggt/infer", json=_json_request(images.numpy()),
                                      timeout=60))
    client = InferenceServerClient(url=f"127.0.0.1:{server.port}")
    request = InferInput("images", list(images.shape), "FP32")
    request.set_data_from_numpy(images.numpy(), binary_data=True)
    names = list(served_json)
    result = client.infer("vggt", [request], outputs=[InferRequestedOutput(n, binary_data=True) for n in names])
    served_binary = {name: result.as_numpy(name) for name in names}
    client.close()

    for name in names:
        np.testing.assert_array_equal(served_json[name], served_binary[name])  # same run, two encodings
        noise = output_metrics(reference[name], float_out[name])["rel_l2"]
        metric, tolerance, criterion = tolerance_for("quantized", noise)
        value = output_metrics(served_json[name], reference[name])[metric]
        assert value <= tolerance, f"{name}: {metric} {value:.2e} > {tolerance:.2e} ({criterion})"


MALFORMED = [
    ("not JSON", b"images please", {}, 400, "not valid JSON"),
    ("truncated JSON", json.dumps(_json_request(_random_images(1))).encode()[:5000], {}, 400, "not valid JSON"),
    ("wrong dtype", json.dumps(_json_request(_random_images(1), datatype="FP64")).encode(), {}, 400, "FP32"),
    ("too many frames", json.dumps(_json_request(_random_images(MAX_FRAMES + 1))).encode(), {}, 400,
     f"takes 1 to {MAX_FRAMES}"),
    ("wrong size", json.dumps(_json_request(np.zeros((1, 1, 3, 56, 70), np.float32))).encode(), {}, 400, "70x70"),
    ("wrong input name", json.dumps(_json_request(_random_images(1), name="image")).encode(), {}, 400, "'images'"),
    ("data shorter than shape", json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 3, 70, 70],
                                                        "datatype": "FP32", "data": [0.5] * 10}]}).encode(), {}, 400,
     "needs 14700 values"),
    ("unknown output", json.dumps({**_json_request(_random_images(1)), "outputs": [{"name": "normals"}]}).encode(),
     {}, 400, "unknown output"),
    ("NaN", json.dumps(_json_request(np.full((1, 1, 3, 70, 70), np.nan, np.float32))).encode(), {}, 400, "NaN"),
]


def _binary_body(images: np.ndarray, announced: int, sent: int) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": announced}}]}).encode()
    return header + images.tobytes()[:sent], {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(("case", "body", "headers", "status", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_4xx_and_server_keeps_serving(server: RunningServer, case: str, body: bytes,
                                                             headers: dict, status: int, message: str) -> None:
    response = httpx.post(f"{server.url}/v2/models/vggt/infer", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    _assert_serving(server)


def test_binary_and_size_errors(server: RunningServer) -> None:
    images = _random_images(1)
    body, headers = _binary_body(images, images.nbytes, images.nbytes - 100)  # truncated binary tensor
    response = httpx.post(f"{server.url}/v2/models/vggt/infer", content=body, headers=headers)
    assert response.status_code == 400 and "truncated" in response.json()["error"]
    body, headers = _binary_body(images, images.nbytes, images.nbytes)
    headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    response = httpx.post(f"{server.url}/v2/models/vggt/infer", content=body, headers=headers)
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]
    too_big = b"0" * int(MAX_BODY_MB * (1 << 20) + 1)
    response = httpx.post(f"{server.url}/v2/models/vggt/infer", content=too_big)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    # A client that announces more bytes than it sends and hangs up: the server drops it and keeps serving.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v2/models/vggt/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{\"inputs\": [")
    _assert_serving(server)


def test_load_200_requests_8_concurrent_none_lost(server: RunningServer) -> None:
    """Triton's HTTP client, one per thread, 8 threads, 200 requests: every one answered, with the same outputs
    as a single request on the same input (bounded: within the server's queue, no 503 expected)."""
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    images = _random_images(1, seed=3)
    expected = _outputs(httpx.post(f"{server.url}/v2/models/vggt/infer", json=_json_request(images), timeout=60))
    total, workers = 200, 8

    def worker(count: int) -> list[np.ndarray]:
        client = InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
        try:
            depths = []
            for _ in range(count):
                request = InferInput("images", list(images.shape), "FP32")
                request.set_data_from_numpy(images, binary_data=True)
                result = client.infer("vggt", [request], outputs=[InferRequestedOutput("depth", binary_data=True)])
                depths.append(result.as_numpy("depth"))
            return depths
        finally:
            client.close()

    with ThreadPoolExecutor(workers) as pool:
        results = [d for chunk in pool.map(worker, [total // workers] * workers) for d in chunk]
    assert len(results) == total
    for depth in results:
        np.testing.assert_allclose(depth, expected["depth"], rtol=1e-5, atol=1e-6)


class _GatedBackend:
    """A backend whose infer waits for a gate: to hold a request in flight (not a model; a test double)."""

    platform = "test"
    source = Path("gated")

    def __init__(self) -> None:
        self.signature = ModelSignature(TensorMetadata("images", "FP32", (1, -1, 3, 14, 14)),
                                        (TensorMetadata("depth", "FP32", (1, -1, 14, 14, 1)),), (1, 2))
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.closed = False

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(30)
        return {"depth": np.ones((1, images.shape[1], 14, 14, 1), np.float32)}

    def close(self) -> None:
        self.closed = True


def _gated_request(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/vggt/infer", json=_json_request(np.zeros((1, 1, 3, 14, 14), np.float32)),
                      timeout=60)


def test_full_server_answers_503_then_recovers() -> None:
    backend = _GatedBackend()
    config = ServeConfig("unused", port=0, max_concurrency=1, max_queue=0)
    with RunningServer(config, backend) as running, ThreadPoolExecutor(1) as pool:
        first = pool.submit(_gated_request, running.url)
        assert backend.entered.wait(30)
        busy = _gated_request(running.url)
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        backend.gate.set()
        assert first.result().status_code == 200
        assert _gated_request(running.url).status_code == 200


def test_shutdown_finishes_the_request_in_flight_and_closes_the_backend() -> None:
    backend = _GatedBackend()
    config = ServeConfig("unused", port=0, shutdown_timeout_s=30)
    running = RunningServer(config, backend)
    with running, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_gated_request, running.url)
        assert backend.entered.wait(30)
        running.server.should_exit = True  # SIGTERM: stop accepting, drain
        time.sleep(0.5)
        assert running.thread.is_alive() and not backend.closed  # still draining
        backend.gate.set()
        response = in_flight.result()
        running.thread.join(timeout=30)
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [1, 1, 14, 14, 1]
    assert not running.thread.is_alive() and backend.closed


def test_pytorch_runtime_serves_the_float_model(export_dir: Path) -> None:
    """The pytorch runtime answers with the float model the export came from (config.json: preset, seed)."""
    import torch

    from qvggt_export.model import build_vggt
    from qvggt_export.serve import open_backend

    backend = open_backend(export_dir, "pytorch", max_frames=MAX_FRAMES)
    assert backend.signature.frames == (1, MAX_FRAMES) and backend.signature.resolution == (70, 70)
    images = _random_images(2, seed=5)
    served = backend.infer(images)
    with torch.no_grad():
        expected = build_vggt("tiny", seed=0)(torch.from_numpy(images))
    for name in backend.signature.output_names:
        np.testing.assert_array_equal(served[name], expected[name].numpy())


def test_open_backend_refuses_what_it_cannot_serve(export_dir: Path, tmp_path: Path) -> None:
    from qvggt_export.errors import QVGGTError
    from qvggt_export.serve import open_backend

    with pytest.raises(QVGGTError, match="nothing to serve"):
        open_backend(tmp_path / "missing")
    with pytest.raises(QVGGTError, match="export folder"):
        open_backend(export_dir / "model.onnx", "pytorch")
    with pytest.raises(QVGGTError, match="not found"):
        open_backend(tmp_path, "onnxruntime")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(QVGGTError, match="cannot read ONNX model"):
        open_backend(tmp_path / "bad.onnx")


def test_cli_serve_answers_and_stops_on_sigterm(export_dir: Path) -> None:
    """The real command in a subprocess: serves, answers, and on SIGTERM drains and exits without a traceback
    (uvicorn re-raises the signal after its graceful shutdown: status -15)."""
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "qvggt_export", "serve", str(export_dir), "--runtime",
                                "onnxruntime", "--port", str(port), "--max-frames", "2"],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        response = httpx.post(f"{url}/v2/models/vggt/infer", json=_json_request(_random_images(3)), timeout=60)
        assert response.status_code == 400 and "takes 1 to 2" in response.json()["error"]
        assert httpx.post(f"{url}/v2/models/vggt/infer", json=_json_request(_random_images(2)),
                          timeout=60).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        stderr = process.stderr.read()
    assert code in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr and "serving model 'vggt'" in stderr


def test_serve_config_validation() -> None:
    from qvggt_export.errors import QVGGTError

    for bad in ({"runtime": "tensorflow"}, {"port": 70000}, {"max_concurrency": 0}, {"max_queue": -1},
                {"model_name": "a/b"}, {"max_frames": 0}, {"max_body_mb": 0}):
        with pytest.raises(QVGGTError):
            ServeConfig("x", **bad)


def test_backend_failure_is_a_500_with_the_reason_and_the_server_keeps_serving() -> None:
    from qvggt_export.errors import QVGGTError

    class FailingOnce(_GatedBackend):
        def __init__(self) -> None:
            super().__init__()
            self.gate.set()
            self.failed = False

        def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
            if not self.failed:
                self.failed = True
                raise QVGGTError("TensorRT-RTX failed to run model.engine")
            return super().infer(images)

    with RunningServer(ServeConfig("unused", port=0), FailingOnce()) as running:
        failed = _gated_request(running.url)
        assert failed.status_code == 500 and "failed to run model.engine" in failed.json()["error"]
        assert _gated_request(running.url).status_code == 200
