"""``qvggt-export``: a thin command line over :func:`qvggt_export.pipeline.run_pipeline` (the default command)
and :func:`qvggt_export.parity.check.check_export` (``qvggt-export check``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvggt_export import __version__
from qvggt_export.errors import QVGGTError

EXIT_OK, EXIT_PARITY_FAILED, EXIT_USAGE, EXIT_ENGINE_FAILED = 0, 1, 2, 3

EXAMPLES = """\
examples:
  qvggt-export --bits w4a4 --out out/w4a4
      tiny VGGT, generated calibration sequences, W4A4 DSFQ, ONNX, parity, TensorRT-RTX engine
  qvggt-export --bits w4a4 --method rtn --model tiny-outliers --out out/rtn
      the paper's "Base" on a small model with VGGT-like planted outliers
  qvggt-export --bits w4a4 --method auto --model tiny-outliers --out out/auto
      per block, the transform with the lowest measured error (choices and errors in report.html)
  qvggt-export --bits w8a8 --model tiny-dino --frames 4 --recon-iters 50 --out out/w8a8
  qvggt-export --bits w4a4 --model vggt-1b --checkpoint facebook/VGGT-1B --calib-data co3d/ \
      --calib-strategy nfds --calib-pool 400 --calib-size 40 --frames 10 --out out/1b
      real weights from the local Hugging Face cache, the paper's NFDS calibration set
  qvggt-export --bits fp32 --no-engine --out out/fp32          float reference export only
  qvggt-export --bits w4a4 --out out/x --print-config          show the resolved configuration, run nothing
  qvggt-export check out/w4a4                 re-check an export against its PyTorch model (qvggt-export check -h)
  qvggt-export eval --fidelity --data my_scenes/ out/w4a4     camera AUC, depth, points vs float (eval -h)
  qvggt-export report out/w4a4                regenerate report.html / report.md from the saved artifacts
  qvggt-export serve out/w4a4 --port 8000     serve it over HTTP, KServe v2 / Triton protocol (qvggt-export serve -h)
  qvggt-export serve-repo out/w4a4 models/    write a Triton model repository (qvggt-export serve-repo -h)

exit codes: 0 ok, 1 parity failed, 2 bad input, 3 engine build failed
"""

CHECK_EXAMPLES = """\
examples:
  qvggt-export check out/w4a4
      the export folder's model.onnx (ONNX Runtime CPU) vs its saved fake-quant PyTorch model, on generated
      sequences; per-output metrics and the layer-by-layer check; writes out/w4a4/check.json
  qvggt-export check out/w4a4 --images my_scene/ --preprocess pad
  qvggt-export check --onnx fp16.onnx --bits fp16 --model tiny --report fp16.check.json
  qvggt-export check out/w8a8 --engine out/w8a8/model.engine      also the engine (needs a CUDA GPU)
  qvggt-export check out/fp8        fp8: layer by layer in E4M3 steps, names the first diverging layer
  qvggt-export check out/nvfp4 --frames 1
      nvfp4 (ONNX Runtime cannot run it): structural check of every layer + ONNX's reference evaluator
      (pure NumPy, slow: keep inputs small)

exit codes: 0 all outputs (and layers) within tolerance, 1 a check failed, 2 bad input
"""


def _number(kind: type, minimum: float | None = None, maximum: float | None = None, multiple_of: int | None = None,
            ) -> Callable[[str], int | float]:
    """An argparse type: parse ``kind`` and check its bounds, with a message that says what was expected."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from exc
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        if multiple_of is not None and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of the patch size {multiple_of}, got {value}")
        return value

    return parse


_positive = _number(int, minimum=1)
_non_negative = _number(int, minimum=0)
_unit_interval = _number(float, minimum=0.0, maximum=1.0)
_image_size = _number(int, minimum=14, multiple_of=14)


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SHORT_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _configure_logging(verbose: bool, quiet: int = logging.WARNING) -> None:
    """The CLI's log handler (library code only logs): debug with -v, else ``quiet`` and above."""
    logging.basicConfig(level=logging.DEBUG if verbose else quiet, format=_LOG_FORMAT, datefmt="%H:%M:%S")


def _device(text: str) -> str:
    """An argparse type for --device: its form only (whether the GPU exists is checked when the run starts)."""
    from qvggt_export.device import check_device_spec

    try:
        return check_device_spec(text)
    except QVGGTError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _method_list(text: str) -> tuple[str, ...]:
    from qvggt_export.methods import METHODS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names among {','.join(METHODS)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from qvggt_export.formats import ENGINE_LOWERINGS, format_names
    from qvggt_export.methods import AUTO_CRITERIA, AUTO_GRANULARITIES, METHODS, method_choices
    from qvggt_export.model.config import preset_names

    parser = argparse.ArgumentParser(
        prog="qvggt-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Quantize VGGT, export it to ONNX with Q/DQ, check ONNX Runtime parity against PyTorch, "
                    "and build a TensorRT / TensorRT-RTX engine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--bits", default="w4a4", choices=list(format_names()),
                        help="format: w8a8/w6a6/w4a4 (integer per-channel weights, per-token dynamic activations), "
                             "fp8 (E4M3), nvfp4 (FP4 block 16), or unquantized (default w4a4)")
    parser.add_argument("--out", type=Path, help="output folder (report.json, model.onnx, ...); required unless "
                                                 "--config gives out_dir")
    parser.add_argument("--config", type=Path,
                        help="TOML or JSON file of settings (PipelineConfig field names, e.g. a run's config.json); "
                             "flags given on the command line override it")
    parser.add_argument("--model", default="tiny",
                        help=f"preset ({', '.join(preset_names())}) or a JSON file of official constructor "
                             "arguments (default tiny)")
    parser.add_argument("--checkpoint", help="model.pt / .safetensors / folder / cached HF repo id "
                                             "(default: seeded random weights)")
    parser.add_argument("--method", default="dsfq", choices=list(method_choices()),
                        help="transform before quantization (paper Tab. 4): dsfq = Hadamard rotation then "
                             "smoothing in the rotated space; rtn = none; auto = per block, the candidate with the "
                             "lowest measured block-output error on the calibration set (default dsfq)")
    parser.add_argument("--auto-methods", type=_method_list, default=tuple(METHODS), metavar="M1,M2,...",
                        help=f"--method auto: the candidates, comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--auto-granularity", default="block", choices=list(AUTO_GRANULARITIES),
                        help="--method auto: one method per block (default), or per layer (each linear of a block "
                             "may switch when that lowers the block's error)")
    parser.add_argument("--auto-criterion", default="quantized", choices=list(AUTO_CRITERIA),
                        help="--method auto: compare candidates by their round-to-nearest block error, then learn the "
                             "winner (default), or learn every candidate with --recon-iters and keep the lowest "
                             "learned error (reconstructed: one learning per candidate and block)")
    parser.add_argument("--alpha", type=_unit_interval, default=0.5, help="smoothing strength (default 0.5)")
    parser.add_argument("--recon-iters", type=_non_negative, default=0,
                        help="block-reconstruction steps per block, learning smoothing factors and weight steps "
                             "(default 0 = off)")
    parser.add_argument("--recon-checkpoint", metavar="PATH",
                        help="file where block reconstruction keeps its progress, resumed by a rerun (default: in "
                             "the output folder, carried to the next run of the same command)")
    parser.add_argument("--quantize-scope", default="aggregator", choices=["aggregator", "backbone", "all"],
                        help="linears to quantize: aggregator (the paper's, default), backbone (+ DINOv2 encoder), "
                        "all (+ camera head trunk)")
    parser.add_argument("--calib-data", help="image folder (or folder of them), CO3Dv2 root, video file or folder, "
                                             "or list file (default: generated sequences)")
    parser.add_argument("--calib-strategy", default="nfds", choices=["nfds", "random", "filtered", "clustered"],
                        help="calibration-set selection (default nfds: noise filter + frame-aware clustering)")
    parser.add_argument("--calib-size", type=_positive, default=4, help="sequences selected (default 4; paper 40)")
    parser.add_argument("--calib-pool", type=_positive, default=16,
                        help="candidate sequences drawn before selection (default 16; paper 400)")
    parser.add_argument("--nfds-p", type=_unit_interval, default=0.2,
                        help="NFDS: fraction of highest-scoring (noisiest) candidates dropped (default 0.2)")
    parser.add_argument("--nfds-k", type=_positive, default=8, help="NFDS: K-Means clusters (default 8)")
    parser.add_argument("--nfds-batch", type=_positive, default=8,
                        help="NFDS: candidates per forward of the statistics pass (default 8; same selection at any "
                             "value, about 0.8 GB of GPU memory per candidate for VGGT-1B at 518 px, 10 frames)")
    parser.add_argument("--nfds-correlation", default="flattened", choices=["flattened", "pooled"],
                        help="NFDS eq. 12 frame vectors: flattened = the paper's (each frame's patch tokens as one "
                             "s x d vector, cosine with frame 0 position by position); pooled = mean-pooled frame "
                             "features (the earlier form) (default flattened)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable calibration files with a warning")
    parser.add_argument("--frames", type=_positive, default=3, help="frames per sequence (default 3)")
    parser.add_argument("--image-size", type=_image_size, help="resize width (default: the model's img_size)")
    parser.add_argument("--preprocess", default="crop", choices=["crop", "pad"],
                        help="official loader mode; pad gives square inputs (default crop)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data generation and random init (default 0)")
    parser.add_argument("--hadamard", default="function", choices=["function", "dense"],
                        help="ONNX form of DSFQ's online rotation: an O(d log d) local function, or a dense "
                             "d x d MatMul for comparison (default function)")
    parser.add_argument("--engine-hadamard", default="auto", choices=["auto", "plugin", "function"],
                        help="engine form of DSFQ's rotation: the qvggt::Hadamard TensorRT plugin (Python runtimes "
                             "only), or TensorRT's inlining of the ONNX function (plugin-free: trtexec, Triton, "
                             "C++); auto = function for full TensorRT (--backend trt / trt-* profiles), plugin for "
                             "TensorRT-RTX (default auto; report.json engine.loadable_by lists the runtimes)")
    parser.add_argument("--no-engine", action="store_true", help="stop after ONNX export and parity")
    parser.add_argument("--export-track", action="store_true",
                        help="also export the tracking head as track.onnx (images + query_points -> track, vis, "
                             "conf) and check it in ONNX Runtime")
    parser.add_argument("--engine-profile", default=None,
                        help="build profile name (engines/*.json) or path (default: rtx-default; for fp8 "
                             "rtx-sm89-sm120, for nvfp4 rtx-sm120); a profile given explicitly must suit the format")
    parser.add_argument("--engine-lowering", default="auto",
                        choices=list(ENGINE_LOWERINGS),
                        help="rewrite of the quantized graph for the engine (README 'Engines per target'): auto = "
                             "per format (w4a4 -> w4a16, TensorRT has no 4-bit activation math; w8a8 as written on "
                             "TensorRT-RTX, int8-static on full TensorRT); report.json records its accuracy")
    parser.add_argument("--engine-fp16", action="store_true",
                        help="run the engine's unquantized parts (heads, norms, attention) in FP16; needs a "
                             "lowered integer graph or an fp32 export")
    parser.add_argument("--backend", default="auto", choices=["auto", "rtx", "trt"],
                        help="TensorRT-RTX (builds without a GPU) or full TensorRT (default auto)")
    parser.add_argument("--device", default="auto", type=_device,
                        help="where calibration runs: auto (CUDA when PyTorch sees a GPU, else CPU), cpu, cuda or "
                             "cuda:N (default auto); export and parity always run on the CPU")
    parser.add_argument("--calib-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="precision of the statistics-only passes (NFDS, DSFQ channel maxima) on CUDA: fp32 "
                             "(default, exact) or bf16/fp16 autocast (less memory and time; see "
                             "benchmarks/results/gpu_check.md for the effect)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    from qvggt_export.parity.check import LOCALIZE_MODES

    parser = argparse.ArgumentParser(
        prog="qvggt-export check", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EXAMPLES,
        description="Run an exported ONNX graph (ONNX Runtime CPU; a TensorRT engine with --engine) and the PyTorch "
                    "model it came from on the same inputs through Polygraphy's comparator, report per-output "
                    "metrics against stated tolerances, and for quantized graphs name the first diverging layer. "
                    "nvfp4 graphs, which ONNX Runtime cannot run, are checked structurally and in ONNX's "
                    "reference evaluator instead.")
    parser.add_argument("export_dir", nargs="?", type=Path,
                        help="output folder of a qvggt-export run (config.json, model.onnx, quantized_model.*)")
    parser.add_argument("--onnx", type=Path, help="the graph (default EXPORT_DIR/model.onnx)")
    parser.add_argument("--quantized", type=Path, help="saved fake-quant model quantized_model.json "
                                                       "(default EXPORT_DIR's)")
    parser.add_argument("--bits", help="the graph's format: fp32, fp16 or a quantized format (default EXPORT_DIR's)")
    parser.add_argument("--model", help="float model preset or JSON config (default EXPORT_DIR's)")
    parser.add_argument("--checkpoint", help="float model weights (default EXPORT_DIR's; none = seeded random init)")
    parser.add_argument("--seed", type=int, help="seed of the float model's random init (default EXPORT_DIR's)")
    parser.add_argument("--images", type=Path, help="folder of images, one sequence (default: generated sequences)")
    parser.add_argument("--preprocess", default="crop", choices=["crop", "pad"], help="loader mode for --images")
    parser.add_argument("--frames", type=_positive, nargs="+",
                        help="frame counts of the generated sequences (default: the export's, and 1)")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the generated sequences (default 1)")
    parser.add_argument("--engine", type=Path, help="also run this TensorRT / TensorRT-RTX engine (CUDA GPU only)")
    parser.add_argument("--runtime", help="the runtime the engine is meant for (python, triton-python, serve, "
                                          "triton-tensorrt, trtexec, cpp, rtx-cpp): refused with the reason when "
                                          "it cannot load that engine (e.g. a plugin engine for trtexec)")
    parser.add_argument("--localize", default="always", choices=list(LOCALIZE_MODES),
                        help="layer-by-layer check of integer and fp8 graphs (default always; nvfp4 "
                             "graphs are always checked structurally)")
    parser.add_argument("--report", type=Path, help="JSON report path (default EXPORT_DIR/check.json)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def check_main(argv: list[str]) -> int:
    """``qvggt-export check ...``: one call to :func:`qvggt_export.parity.check.check_export`."""
    args = build_check_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from qvggt_export.parity.check import CheckConfig, check_export, summarize

    try:
        config = CheckConfig(
            export_dir=args.export_dir, onnx=args.onnx, quantized=args.quantized, bits=args.bits, model=args.model,
            checkpoint=args.checkpoint, seed=args.seed, images=args.images, preprocess=args.preprocess,
            frames=tuple(args.frames) if args.frames else None, input_seed=args.input_seed, engine=args.engine,
            runtime=args.runtime, localize=args.localize, report=args.report)
        report = check_export(config)
    except QVGGTError as exc:
        print(f"qvggt-export check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qvggt-export check: interrupted", file=sys.stderr)
        return 130
    print("\n".join(summarize(report)))
    if not report["passed"]:
        failing = report["first_failing_layer"]
        print("qvggt-export check: FAILED" + (f" (first diverging layer: {failing})" if failing else ""),
              file=sys.stderr)
        return EXIT_PARITY_FAILED
    return EXIT_OK


# --- eval / report subcommands (issue 14) -------------------------------------------------------------------

EVAL_EXAMPLES = """\
examples:
  qvggt-export eval --fidelity --data ../shared/data/sequences out/w4a4
      quantized vs float model on any sequences: camera AUC, depth and point-map errors; writes out/w4a4/eval.json
  qvggt-export eval --data /datasets/co3d out/w4a4
      float and quantized model against CO3Dv2 ground truth (VGGT's .jgz annotations; also 7-Scenes, DTU)
  qvggt-export eval --fidelity --runtime onnxruntime --data clip.mp4 out/w8a8      model.onnx in ONNX Runtime

exit codes: 0 ok, 2 bad input
"""


def build_eval_parser() -> argparse.ArgumentParser:
    from qvggt_export.eval.evaluate import RUNTIMES
    from qvggt_export.eval.metrics import CONVENTIONS

    parser = argparse.ArgumentParser(
        prog="qvggt-export eval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EXAMPLES,
        description="Score an export's quantized model in the field's metrics (camera-pose AUC@30/15/5/3, RRA, "
                    "RTA; depth abs-rel and delta < 1.25; point-map Accuracy, Completion, Normal Consistency) "
                    "against ground truth, or with --fidelity against the float model.")
    parser.add_argument("out_dir", type=Path, help="output folder of a qvggt-export run (eval.json is written there)")
    parser.add_argument("--data", type=Path, required=True,
                        help="CO3Dv2 / 7-Scenes / DTU folder (ground truth), or with --fidelity any image folder, "
                             "folder of scenes, video or list file")
    parser.add_argument("--fidelity", action="store_true", help="the float model's outputs as the reference")
    parser.add_argument("--runtime", default="pytorch", choices=list(RUNTIMES),
                        help="quantized model as PyTorch fake quant, model.onnx in ONNX Runtime, or model.engine "
                             "(CUDA GPU only) (default pytorch)")
    parser.add_argument("--frames", type=_number(int, minimum=2), help="frames per sequence (default: the export's)")
    parser.add_argument("--max-sequences", type=_positive, default=8, help="sequences evaluated (default 8)")
    parser.add_argument("--convention", default="camera", choices=list(CONVENTIONS),
                        help="relative pose: camera = E_j E_i^-1 (world-frame free), vggt = VGGT's script "
                             "(default camera)")
    parser.add_argument("--split", default="test", choices=["test", "train"], help="CO3Dv2 annotation split")
    parser.add_argument("--preprocess", choices=["crop", "pad"],
                        help="loader mode (default: the export's; pad fits non-square photos to a square export)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frame choice (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


SERVE_EXAMPLES = """\
examples:
  qvggt-export serve out/w4a4 --runtime onnxruntime --port 8000
      model.onnx on ONNX Runtime (CPU) at http://127.0.0.1:8000/v2/models/vggt/infer
  qvggt-export serve out/w8a8/model.engine --host 0.0.0.0 --max-concurrency 1      the engine (CUDA GPU)
  curl -s localhost:8000/v2/models/vggt          inputs, outputs, frame range (KServe v2 model metadata)

The protocol is KServe v2 / Triton HTTP (JSON tensors and Triton's binary tensor extension), so Triton's client
(tritonclient.http) works against it. Requests: one sequence, images [S, 3, H, W] or [1, S, 3, H, W] FP32 in
[0, 1], preprocessed as the export. Errors: 400 invalid request, 404 unknown model, 413 body too large, 503 busy.
"""


def build_serve_parser() -> argparse.ArgumentParser:
    from qvggt_export.serve.backends import RUNTIMES

    parser = argparse.ArgumentParser(
        prog="qvggt-export serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EXAMPLES,
        description="Serve an export over HTTP with the KServe v2 / Triton inference protocol, backed by its "
                    "TensorRT engine (CUDA GPU), its ONNX graph on ONNX Runtime, or its float PyTorch model.")
    parser.add_argument("source", type=Path, help="export folder, .onnx graph or .engine file")
    parser.add_argument("--runtime", default="auto", choices=list(RUNTIMES),
                        help="auto: an .engine file or a folder's model.engine when a GPU is visible -> tensorrt, "
                             "else model.onnx -> onnxruntime; pytorch: the export's float model (default auto)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in "
                                                             "a container)")
    parser.add_argument("--port", type=_number(int, minimum=0, maximum=65535), default=8000,
                        help="TCP port (default 8000; 0 = any free port)")
    parser.add_argument("--model-name", default="vggt", help="model name in the URLs (default vggt)")
    parser.add_argument("--max-frames", type=_positive,
                        help="frames per request, at most (default: an engine's profile maximum, else 32)")
    parser.add_argument("--max-concurrency", type=_positive, default=1, help="requests computed at once (default 1)")
    parser.add_argument("--max-queue", type=_non_negative, default=16,
                        help="requests waiting beyond those; one more is answered 503 (default 16)")
    parser.add_argument("--max-body-mb", type=_number(float, minimum=0.001), default=256.0,
                        help="largest request body in MiB, 413 above (default 256)")
    parser.add_argument("--device", help="cuda:N for engines (default cuda:0); cpu or cuda:N for pytorch")
    parser.add_argument("--threads", type=_non_negative, default=0,
                        help="ONNX Runtime intra-op threads per request (default 0 = its default)")
    parser.add_argument("--ort-exact", action="store_true",
                        help="ONNX Runtime with the parity checker's settings (QDQ fusions off: the arithmetic "
                             "qvggt-export check measures) instead of its integer kernels (the default, faster)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def eval_main(argv: list[str]) -> int:
    """``qvggt-export eval ...``: one call to :func:`qvggt_export.eval.evaluate.evaluate`."""
    args = build_eval_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from qvggt_export.eval.evaluate import EvalConfig, evaluate, summarize

    try:
        report = evaluate(EvalConfig(out_dir=args.out_dir, data=args.data, fidelity=args.fidelity,
                                     runtime=args.runtime, frames=args.frames, max_sequences=args.max_sequences,
                                     convention=args.convention, split=args.split, seed=args.seed,
                                     preprocess=args.preprocess,
                                     progress=not args.no_progress))
        from qvggt_export.report import write_report

        if (args.out_dir / "report.json").is_file():
            report["html"] = str(write_report(args.out_dir)["html"])
    except QVGGTError as exc:
        print(f"qvggt-export eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qvggt-export eval: interrupted", file=sys.stderr)
        return 130
    print("\n".join(summarize(report)))
    if report.get("html"):
        print(f"html:   {report['html']}")
    return EXIT_OK


def report_main(argv: list[str]) -> int:
    """``qvggt-export report OUT_DIR``: rebuild report.html / report.md from the folder's saved artifacts."""
    parser = argparse.ArgumentParser(prog="qvggt-export report",
                                     description="Regenerate report.html and report.md (with their PNGs) of an "
                                                 "output folder from its saved artifacts.")
    parser.add_argument("out_dir", type=Path, help="output folder of a qvggt-export run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=_SHORT_LOG_FORMAT)
    from qvggt_export.report import write_report

    try:
        paths = write_report(args.out_dir)
    except QVGGTError as exc:
        print(f"qvggt-export report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return EXIT_OK




def _with_config_file(args: argparse.Namespace, argv: list[str], settings: dict[str, Any]) -> Any:
    """``PipelineConfig`` from the flags, on top of ``--config FILE`` when given (flags on the command line win)."""
    from qvggt_export.config_file import merge_settings
    from qvggt_export.pipeline import PipelineConfig

    # Which flags were typed: parse again with every default suppressed.
    typed = build_parser()
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(typed.parse_args(argv)))
    renamed = {"out": "out_dir", "no_engine": "engine", "no_progress": "progress"}
    explicit = {renamed.get(name, name) for name in given}
    merged = merge_settings(args.config, settings, explicit, PipelineConfig)
    if merged.get("out_dir") is None:
        raise QVGGTError("--out is required (or out_dir in the --config file)")
    return PipelineConfig(**merged)

# --- end of eval / report subcommands -----------------------------------------------------------------------
def serve_main(argv: list[str]) -> int:
    """``qvggt-export serve ...``: one call to :func:`qvggt_export.serve.serve`."""
    args = build_serve_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from qvggt_export.serve import ServeConfig, serve

    try:
        serve(ServeConfig(source=args.source, runtime=args.runtime, host=args.host, port=args.port,
                          model_name=args.model_name, max_frames=args.max_frames,
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          max_body_mb=args.max_body_mb, device=args.device, threads=args.threads,
                          ort_exact=args.ort_exact))
    except QVGGTError as exc:
        print(f"qvggt-export serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def build_serve_repo_parser() -> argparse.ArgumentParser:
    from qvggt_export.serve.triton_repo import ENGINE_MODELS

    parser = argparse.ArgumentParser(
        prog="qvggt-export serve-repo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Triton Inference Server model repository for an export: <name>_onnx (ONNX Runtime, "
                    "CPU fallback) and <name>_trt (tensorrt_plan for a plugin-free full-TensorRT engine, else a "
                    "Python-backend model running the engine with the project's runtime, plugin registered).",
        epilog="example:\n  qvggt-export serve-repo out/w8a8 models/\n  docker run --gpus all -v $PWD/models:/models "
               "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository /models")
    parser.add_argument("export_dir", type=Path, help="output folder of a qvggt-export run")
    parser.add_argument("repo_dir", type=Path, help="model repository folder (created; other models kept)")
    parser.add_argument("--name", default="vggt", help="model name prefix (default vggt: vggt_onnx, vggt_trt)")
    parser.add_argument("--engine-model", default="auto", choices=list(ENGINE_MODELS),
                        help="form of the engine model: auto (tensorrt_plan when the engine allows it, else python), "
                             "tensorrt (refused with the reason when Triton's TensorRT backend cannot load the "
                             "engine), python, none (default auto)")
    parser.add_argument("--gpu-instances", type=_positive, default=1, help="engine model instances per GPU")
    parser.add_argument("--cpu-instances", type=_positive, default=1, help="ONNX Runtime model instances")
    parser.add_argument("--overwrite", action="store_true", help="replace models of the same name")
    return parser


def serve_repo_main(argv: list[str]) -> int:
    """``qvggt-export serve-repo ...``: one call to :func:`qvggt_export.serve.triton_repo.write_model_repository`."""
    args = build_serve_repo_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=_SHORT_LOG_FORMAT)
    from qvggt_export.serve.triton_repo import TritonRepoConfig, write_model_repository

    try:
        summary = write_model_repository(TritonRepoConfig(
            export_dir=args.export_dir, repo_dir=args.repo_dir, name=args.name, engine_model=args.engine_model,
            gpu_instances=args.gpu_instances, cpu_instances=args.cpu_instances, overwrite=args.overwrite))
    except QVGGTError as exc:
        print(f"qvggt-export serve-repo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for model in summary["models"]:
        print(f"{model['name']:16s} {model['kind']:12s} {model['why']}")
    print(f"repository: {summary['repository']}")
    return EXIT_OK


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"check": check_main, "eval": eval_main,
                                                      "report": report_main, "serve": serve_main,
                                                      "serve-repo": serve_repo_main}


def main(argv: list[str] | None = None) -> int:
    """The console entry point: Ctrl-C at any moment (parsing, imports, any stage) is exit 130 and one line;
    the run's staging folder is removed on the way out and the previous run in ``--out`` stays as it was."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("qvggt-export: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        # A subcommand by its first word: the flag-only main command (qvggt-export --bits ... --out ...) keeps
        # working unchanged, which argparse subparsers with a default command would not guarantee.
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, quiet=logging.INFO)
    from qvggt_export.pipeline import run_pipeline

    try:
        settings = dict(
            out_dir=args.out, bits=args.bits, model=args.model, checkpoint=args.checkpoint, method=args.method,
            auto_methods=args.auto_methods, auto_granularity=args.auto_granularity, auto_criterion=args.auto_criterion,
            alpha=args.alpha, recon_iters=args.recon_iters, recon_checkpoint=args.recon_checkpoint,
            quantize_scope=args.quantize_scope,
            calib_data=args.calib_data, calib_size=args.calib_size, calib_pool=args.calib_pool,
            calib_strategy=args.calib_strategy, nfds_p=args.nfds_p, nfds_k=args.nfds_k, nfds_batch=args.nfds_batch,
            nfds_correlation=args.nfds_correlation,
            skip_bad=args.skip_bad, frames=args.frames,
            image_size=args.image_size, preprocess=args.preprocess, seed=args.seed, engine=not args.no_engine,
            hadamard=args.hadamard, engine_hadamard=args.engine_hadamard, engine_profile=args.engine_profile,
            export_track=args.export_track, engine_lowering=args.engine_lowering, engine_fp16=args.engine_fp16,
            backend=args.backend, device=args.device, calib_dtype=args.calib_dtype,
            progress=not args.no_progress)
        config = _with_config_file(args, argv, settings)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return EXIT_OK
        report = run_pipeline(config)
    except QVGGTError as exc:
        print(f"qvggt-export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    parity = report["parity"]
    engine = report["engine"]
    print(f"report: {config.out_dir / 'report.json'}")
    print(f"onnx:   {report['onnx']['path']} ({report['onnx']['size_bytes'] / 1e6:.2f} MB)")
    if engine.get("path"):
        print(f"engine: {engine['path']} ({engine.get('size_bytes', 0) / 1e6:.2f} MB, "
              f"targets {' '.join(engine.get('target_sms') or [])}, {engine.get('num_layers')} layers, "
              f"Hadamard: {engine.get('hadamard')}, lowering: {(engine.get('lowering') or {}).get('target')})")
    else:
        print(f"engine: none ({engine['reason']})")
    for name, out in parity["outputs"].items():
        status = "ok" if out["passed"] else "FAILED"
        print(f"parity {name:18s} max_abs {out['max_abs']:.2e}  rel_l2 {out['rel_l2']:.2e}  "
              f"tol {out['tolerance']:.2e}  {status}")
    if "layers" in parity:
        layers = parity["layers"]
        worst = max((entry["output_rel"] for entry in layers["layers"]), default=0.0)
        print(f"parity {len(layers['layers'])} quantized layers (teacher-forced): worst output rel_l2 {worst:.1e}, "
              f"first failing: {layers['first_failing_layer'] or 'none'}")
    track_parity = (report.get("track") or {}).get("parity") or {}
    if track_parity:
        print(f"track:  {report['track']['path']} (parity: "
              f"{ {None: 'not run', True: 'ok', False: 'FAILED'}[track_parity.get('passed')] })")
    track_engine = (report.get("track") or {}).get("engine") or {}
    if track_engine.get("path"):
        print(f"track engine: {track_engine['path']} ({track_engine.get('size_bytes', 0) / 1e6:.2f} MB, "
              f"points {'/'.join(map(str, (track_engine.get('profile') or {}).get('points', {}).values()))})")
    elif track_engine:
        print(f"track engine: none ({track_engine.get('reason') or track_engine.get('error')})")
    if not parity["passed"] or track_parity.get("passed") is False:
        print("qvggt-export: parity check FAILED", file=sys.stderr)
        return EXIT_PARITY_FAILED
    if engine.get("failed") or track_engine.get("failed"):
        return EXIT_ENGINE_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
