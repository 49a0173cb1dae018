"""Load on ``qvggt-export serve``: latency percentiles and throughput through Triton's own HTTP client.

Starts the real command (``qvggt-export serve EXPORT --runtime onnxruntime``) as a subprocess on 127.0.0.1 and a
free port, then sends the same request (one sequence of random 70x70 frames, binary tensors) in two phases:

* ``sequential``: one client, one request at a time (the latency floor);
* ``concurrent``: ``--workers`` clients in threads, ``--requests`` requests in all;
* ``sequential (again)``: the first phase repeated after the load, to show how much the shared machine drifts;
* ``compute``: the same ONNX Runtime session settings in this process, no HTTP (the floor a request cannot beat).

Per phase: requests answered / sent, latency p50 / p90 / p99 / max in ms (client side, request to decoded
response), throughput in requests per second; and the ratios concurrent / sequential in the same run. Without
``--export`` it first makes the tiny W8A8 export the tests use (``run_pipeline``, no engine).

Writes benchmarks/results/serve_load.{json,md}.

    python benchmarks/serve_load.py [--export out/w8a8] [--requests 200] [--workers 8] [--frames 2]   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_export(folder: Path) -> Path:
    from qvggt_export.pipeline import PipelineConfig, run_pipeline

    out = folder / "w8a8"
    run_pipeline(PipelineConfig(out_dir=out, bits="w8a8", engine=False, progress=False, calib_size=2, calib_pool=4,
                                frames=2))
    return out


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "max_ms": float(values.max()),
            "mean_ms": float(values.mean())}


def _phase(port: int, images: np.ndarray, requests: int, workers: int) -> dict[str, object]:
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    def run(count: int) -> tuple[list[float], int]:
        client = InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=300)
        latencies, failures = [], 0
        try:
            for _ in range(count):
                started = time.perf_counter()
                try:
                    request = InferInput("images", list(images.shape), "FP32")
                    request.set_data_from_numpy(images, binary_data=True)
                    result = client.infer("vggt", [request], outputs=[InferRequestedOutput("depth")])
                    assert result.as_numpy("depth").shape[:2] == (1, images.shape[1])
                except Exception:  # counted, not raised: the benchmark reports lost requests
                    failures += 1
                    continue
                latencies.append(1e3 * (time.perf_counter() - started))
        finally:
            client.close()
        return latencies, failures

    share = [requests // workers + (1 if i < requests % workers else 0) for i in range(workers)]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, share))
    seconds = time.perf_counter() - started
    latencies = [x for chunk, _ in results for x in chunk]
    failures = sum(f for _, f in results)
    return {"requests": requests, "workers": workers, "answered": len(latencies), "lost": failures,
            "seconds": round(seconds, 3), "throughput_rps": round(len(latencies) / seconds, 2),
            **{k: round(v, 2) for k, v in _percentiles(latencies).items()}}


def _compute(export: Path, images: np.ndarray, runs: int) -> dict[str, object]:
    """The backend alone, in this process: what one request costs without HTTP, encoding or queueing."""
    from qvggt_export.serve.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(export / "model.onnx", images.shape[1])
    backend.infer(images)
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        backend.infer(images)
        latencies.append(1e3 * (time.perf_counter() - started))
    return {"requests": runs, "workers": 1, "answered": runs, "lost": 0,
            "throughput_rps": round(1e3 * runs / sum(latencies), 2),
            **{k: round(v, 2) for k, v in _percentiles(latencies).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, help="export folder to serve (default: make the tiny W8A8 export)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--sequential", type=int, default=40, help="requests of the one-client phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        export = args.export or _make_export(Path(scratch))
        port = _free_port()
        command = [sys.executable, "-m", "qvggt_export", "serve", str(export), "--runtime", "onnxruntime",
                   "--port", str(port), "--max-concurrency", str(args.max_concurrency), "--max-queue",
                   str(args.workers * 2)]
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {server.stderr.read() if server.stderr else ''}")
                time.sleep(0.2)
            metadata = httpx.get(f"http://127.0.0.1:{port}/v2/models/vggt").json()
            height, width = metadata["inputs"][0]["shape"][-2:]
            images = np.random.default_rng(0).random((1, args.frames, 3, height, width), dtype=np.float32)
            _phase(port, images, 4, 1)  # warm-up
            sequential = _phase(port, images, args.sequential, 1)
            concurrent = _phase(port, images, args.requests, args.workers)
            sequential_again = _phase(port, images, args.sequential, 1)
        finally:
            server.terminate()
            code = server.wait(timeout=60)
        compute = _compute(export, images, args.sequential)
    result = {
        "command": " ".join(["qvggt-export", *command[3:]]).replace(str(export), "EXPORT").replace(str(port), "PORT"),
        "client": "tritonclient.http (binary tensors), one client per thread",
        "model": "tiny W8A8 DSFQ export (random weights), ONNX Runtime CPU", "input_shape": list(images.shape),
        "server_exit_code_after_sigterm": code,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs)",
        "sequential": sequential, "concurrent": concurrent, "sequential_again": sequential_again,
        "compute": compute,
        "ratios": {"p50_sequential_over_compute": round(sequential["p50_ms"] / compute["p50_ms"], 2),
                   "p50_concurrent_over_sequential": round(concurrent["p50_ms"] / sequential["p50_ms"], 2),
                   "throughput_concurrent_over_sequential":
                       round(concurrent["throughput_rps"] / sequential["throughput_rps"], 2)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for name in ("compute", "sequential", "concurrent", "sequential_again"):
        phase = result[name]
        label = name.replace("_", " ")
        rows.append(f"| {label} | {phase['workers']} | {phase['answered']}/{phase['requests']} | {phase['lost']} | "
                    f"{phase['p50_ms']:.1f} | {phase['p90_ms']:.1f} | {phase['p99_ms']:.1f} | {phase['max_ms']:.1f} | "
                    f"{phase['throughput_rps']:.1f} |")
    md = "\n".join([
        "# `qvggt-export serve` under load (benchmarks/serve_load.py)", "",
        f"Server: `{result['command']}`; {result['model']}; input {result['input_shape']}; "
        f"client: {result['client']}; {result['machine']}.", "",
        "| phase | clients | answered | lost | p50 ms | p90 ms | p99 ms | max ms | req/s |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "`compute`: the backend alone in the benchmark's process (no HTTP, no encoding, no queue). "
        "`sequential again` repeats the first phase after the load: its distance from `sequential` is the drift of "
        "the shared machine during the run.", "",
        f"One request over HTTP / the backend alone (p50): x{result['ratios']['p50_sequential_over_compute']}. "
        f"Concurrent / sequential in this run: p50 latency x{result['ratios']['p50_concurrent_over_sequential']}, "
        f"throughput x{result['ratios']['throughput_concurrent_over_sequential']}. "
        f"The server was then stopped with SIGTERM: it drained and exited with status {code} (uvicorn re-raises the "
        "signal after its graceful shutdown, so -15 is the normal end).", "",
    ])
    (RESULTS / "serve_load.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
