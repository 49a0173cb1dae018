"""Cost of the online Hadamard: forward time of a DSFQ-quantized VGGT vs the same model quantized with
round-to-nearest (no transform), and vs the dense-matmul rotation the published code uses.

Model: VGGT-1B's aggregator width (1024, 16 heads, MLP 4096, so the Hadamard sizes are 1024 and 4096)
with 2 frame + 2 global blocks and small heads, 4 frames at 224x224 (P = 261 tokens per frame). PyTorch
fake-quant on the CPU: it measures the transform's overhead relative to the rest of the forward, not
the speed of integer kernels. Ratios are taken in one run, interleaving the variants.
Writes benchmarks/results/dsfq_speed.{json,md}.

    python benchmarks/dsfq_speed.py          # ~2 minutes on 2 cores
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from qvggt_export.model import build_vggt
from qvggt_export.quant.calibrate import calibrate
from qvggt_export.quant.config import QuantConfig
from qvggt_export.quant.hadamard import hadamard_matrix
from qvggt_export.quant.modules import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = {
    "aggregator": {"img_size": 224, "embed_dim": 1024, "depth": 2, "num_heads": 16, "patch_embed": "conv"},
    "camera_head": {"dim_in": 2048, "trunk_depth": 1, "num_heads": 16},
    "depth_head": {"dim_in": 2048, "features": 32, "out_channels": [16, 32, 64, 64], "output_dim": 2,
                   "activation": "exp", "intermediate_layer_idx": [0, 1, 0, 1]},
    "point_head": None, "track_head": None,
}


class _DenseRotation(torch.nn.Module):
    """QuantLinear whose online rotation is a dense ``x @ R`` (the published code's approach)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.layer = layer
        size = layer.in_features
        self.register_buffer("matrix", hadamard_matrix(size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x = x * layer.input_pre if layer.input_pre is not None else x
        x = x @ self.matrix
        x = x * layer.input_post if layer.input_post is not None else x
        rotate, layer.rotate = layer.rotate, False
        pre, post = layer.input_pre, layer.input_post
        layer.input_pre = layer.input_post = None
        try:
            return layer(x)
        finally:
            layer.rotate, layer.input_pre, layer.input_post = rotate, pre, post


def _time(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    images = torch.rand(1, 4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calib = [torch.rand(1, 2, 3, 224, 224, generator=torch.Generator().manual_seed(1))]
    variants = {}
    for method in ("rtn", "dsfq"):
        model = build_vggt(CONFIG)
        calibrate(model, QuantConfig(bits="w4a4", method=method), calib)
        variants[method] = model
    dense = build_vggt(CONFIG)
    calibrate(dense, QuantConfig(bits="w4a4", method="dsfq"), calib)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, _DenseRotation(module))
    variants["dsfq_dense_rotation"] = dense
    for model in variants.values():  # warm-up
        _time(model, images, 1)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(5):
        for name, model in variants.items():
            samples[name] += _time(model, images, 1)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    result = {"threads": torch.get_num_threads(), "frames": 4, "resolution": [224, 224], "median_s": medians,
              "dsfq_over_rtn": medians["dsfq"] / medians["rtn"],
              "dense_rotation_over_rtn": medians["dsfq_dense_rotation"] / medians["rtn"], "samples_s": samples}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dsfq_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Online Hadamard cost (W4A4 fake-quant forward, CPU)", "",
             f"1024-wide VGGT, 2+2 blocks, 4 frames at 224x224, {torch.get_num_threads()} threads, median of 5.", "",
             "| variant | forward s | vs RTN |", "|---|---|---|"]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.3f} | {value / medians['rtn']:.2f}x |")
    lines += ["", f"Goal: DSFQ <= 1.3x RTN. Measured {result['dsfq_over_rtn']:.2f}x "
              f"(dense-matmul rotation: {result['dense_rotation_over_rtn']:.2f}x)."]
    (RESULTS / "dsfq_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
