"""``report.html`` (one self-contained file, PNGs as base64 data URIs, opens offline) and ``report.md`` (PNGs in
``report/``) beside ``report.json``, drawn from saved artifacts only: ``report.json``, ``report_data.npz``
(activation statistics, :mod:`qvggt_export.report.activations`), ``calibration/selection.png`` (the NFDS plot),
``eval.json`` and ``check.json`` when present. :func:`write_report` is what ``qvggt-export report OUT_DIR`` and the
end of a pipeline run call.

Sections: per-layer weight quantization error (worst first), ``--method auto``'s choice per block with every
candidate's measured error, activation histograms and channel saliency of chosen
layers before rotation / after rotation / after rotation + smoothing, the calibration selection (NFDS clusters),
parity per output, sizes and timings, and the eval table when ``qvggt-export eval`` ran.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qvggt_export.errors import MissingDependencyError, QVGGTError
from qvggt_export.io import atomic_write, write_text_atomic

logger = logging.getLogger(__name__)

FIGURES_DIR = "report"
WORST_LAYERS = 25


def _plt() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("matplotlib", "calib", "the visual report") from exc
    matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QVGGTError(f"cannot read {path}: {exc}") from exc


# ------------------------------------------------------------------------------------------------ figures


def plot_layer_errors(weight_errors: dict[str, float], path: Path, worst: int = WORST_LAYERS) -> Path:
    plt = _plt()
    items = sorted(weight_errors.items(), key=lambda kv: kv[1], reverse=True)[:worst]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(items) + 1.2))
    names = [name for name, _ in items][::-1]
    ax.barh(names, [value for _, value in items][::-1], color="#c0504d")
    ax.set_xlabel("weight relative error ||W_q - W|| / ||W||")
    ax.set_title(f"Per-layer weight quantization error, worst {len(items)} of {len(weight_errors)}")
    ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def plot_method_selection(selection: dict[str, Any], path: Path) -> Path:
    """``--method auto``: every candidate's relative block-output error per block (log scale), the choice ringed;
    the errors after learning when the criterion learned every candidate, else the round-to-nearest ones."""
    plt = _plt()
    learned = any(record.get("learned_errors") for record in selection["blocks"].values())
    key = "learned_errors" if learned else "errors"
    blocks = [b for b, record in selection["blocks"].items() if record.get(key)]
    candidates = list(selection.get("candidates") or [])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(blocks) + 2), 3.6))
    x = np.arange(len(blocks))
    for method in candidates:
        values = [selection["blocks"][b][key].get(method, np.nan) for b in blocks]
        ax.plot(x, values, marker=".", linewidth=1, label=method)
    chosen = [selection["blocks"][b][key].get(selection["blocks"][b]["method"], np.nan) for b in blocks]
    ax.scatter(x, chosen, s=90, facecolors="none", edgecolors="black", linewidths=1.2, label="chosen", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x, [b.replace("aggregator.", "").replace("_blocks.", ".") for b in blocks], rotation=90, fontsize=6)
    ax.set_ylabel("relative block-output error")
    ax.set_title("--method auto: each candidate's error per block ("
                 + ("after learning" if learned else "round-to-nearest") + ", calibration set)")
    ax.legend(fontsize=7, ncol=3)
    return _save(fig, path)


def plot_activation_layer(layer: dict[str, Any], arrays: dict[str, np.ndarray], stages: list[str], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6.2))
    index = layer["index"]
    for column, stage in enumerate(stages):
        counts = arrays[f"l{index}_s{column}_hist"]
        edges = arrays[f"l{index}_s{column}_edges"]
        absmax = arrays[f"l{index}_s{column}_absmax"]
        stats = layer["stages"][stage]
        hist_ax, chan_ax = axes[0, column], axes[1, column]
        filled = counts > 0  # empty bins have no height on a log axis: leave them out
        hist_ax.bar(edges[:-1][filled], counts[filled], width=np.diff(edges)[filled], align="edge", color="#4f81bd")
        hist_ax.set_yscale("log")
        hist_ax.set_title(f"{stage}\nmax |x| {stats['max_abs']:.3g}, kurtosis {stats['kurtosis']:.3g}", fontsize=9)
        hist_ax.set_xlabel("value")
        chan_ax.bar(np.arange(len(absmax)), absmax, width=1.0, color="#9bbb59")
        chan_ax.set_title(f"channel max |x|: max / median {stats['outlier_ratio']:.1f}", fontsize=9)
        chan_ax.set_xlabel("input channel")
    axes[0, 0].set_ylabel("count (log)")
    axes[1, 0].set_ylabel("max |x| per channel")
    fig.suptitle(f"{layer['name']} ({layer['tokens']} tokens x {layer['channels']} channels; {layer['source']})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_parity(outputs: dict[str, dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    names = list(outputs)
    measured = [max(outputs[n].get("rel_l2", 0.0), 1e-12) for n in names]
    tolerance = [max(outputs[n].get("tolerance", 0.0), 1e-12) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(x - 0.2, measured, 0.4, label="ONNX Runtime vs PyTorch (rel. L2)", color="#4f81bd")
    ax.bar(x + 0.2, tolerance, 0.4, label="tolerance", color="#bfbfbf")
    ax.set_xticks(x, names, rotation=20)
    ax.set_yscale("log")
    ax.set_title("Parity per output")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_timings(timings: dict[str, float], path: Path) -> Path:
    plt = _plt()
    items = [(k, v) for k, v in timings.items() if k != "total"]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(items) + 1.2))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#8064a2")
    ax.set_xlabel("seconds")
    ax.set_title(f"Stage timings (total {timings.get('total', sum(v for _, v in items)):.1f} s)")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ document


def _sizes(out_dir: Path, report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for label, file in (("ONNX graph", "model.onnx"), ("ONNX external data", "model.onnx.data"),
                        ("quantized model (safetensors)", "quantized_model.safetensors"),
                        ("engine", "model.engine"), ("track graph", "track.onnx")):
        if (out_dir / file).is_file():
            rows.append((f"{label} (`{file}`)", f"{(out_dir / file).stat().st_size / 1e6:.2f} MB"))
    onnx = report.get("onnx") or {}
    if onnx.get("nodes"):
        rows.append(("ONNX nodes / quantized linears", f"{onnx['nodes']} / {onnx.get('quantized_linears')}"))
    engine = report.get("engine") or {}
    if not engine.get("path") and engine.get("reason"):
        rows.append(("engine", f"not built: {engine['reason']}"))
    return rows


class _Doc:
    """Builds the Markdown and the HTML in step (same sections, tables and figures)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c)).replace('`', '')}</td>" for c in row) + "</tr>"
                       for row in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, path: Path, caption: str) -> None:
        relative = path.relative_to(self.out_dir).as_posix()
        self.md.append(f"![{caption}]({relative})\n")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def render_html(self, title: str) -> str:
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "font-size:13px;text-align:right}th{background:#f2f2f2}td:first-child{text-align:left}"
                 "img{max-width:100%}figcaption{font-size:12px;color:#555}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(self.html)}</body></html>\n")


def write_report(out_dir: str | Path) -> dict[str, Path]:
    """Draw the figures and write ``report.md`` and ``report.html`` from the folder's saved artifacts.

    Returns:
        ``{"html": ..., "markdown": ..., "figures": <folder>}``.

    Raises:
        QVGGTError: ``out_dir`` has no ``report.json``; :class:`MissingDependencyError` without matplotlib.
    """
    from qvggt_export.report.activations import load_report_data

    out_dir = Path(out_dir)
    report = _read_json(out_dir / "report.json")
    if report is None:
        raise QVGGTError(f"{out_dir} has no report.json: is it a qvggt-export output folder?")
    _plt()  # a missing matplotlib fails here, before anything is written
    figures = out_dir / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    title = f"qvggt-export report: {report.get('bits')} {report.get('method') or ''}".strip()
    doc = _Doc(out_dir)
    doc.heading(title, 1)
    model = report.get("model") or {}
    calibration = report.get("calibration") or {}
    doc.para(f"Model {model.get('name', model.get('preset'))} ({model.get('parameters', 0) / 1e6:.1f} M parameters, "
             f"weights: {model.get('weights')}); {report.get('tool')}, torch {report.get('torch')}. Calibration: "
             f"{calibration.get('selected')} of {calibration.get('pool')} candidate sequences "
             f"({calibration.get('strategy')}), {calibration.get('frames')} frames at {calibration.get('resolution')}.")

    evaluation = _read_json(out_dir / "eval.json")
    if evaluation is not None and (out_dir / "eval.json").stat().st_mtime < (out_dir / "report.json").stat().st_mtime:
        doc.heading("Evaluation")
        doc.para("eval.json predates this run's report.json (it scored an earlier model in this folder): run "
                 "qvggt-export eval again.")
        evaluation = None
    if evaluation is not None:
        from qvggt_export.eval.evaluate import table_rows

        doc.heading("Evaluation")
        doc.para(f"{evaluation['mode'].replace('_', ' ')} on {evaluation['data']}: {evaluation['sequences']} "
                 f"sequences x {evaluation['frames']} frames, runtime {evaluation['runtime']}, reference: "
                 f"{evaluation['reference']}; relative poses: {evaluation['convention']} convention.")
        doc.table(["", "AUC@30", "AUC@15", "AUC@5", "AUC@3", "RRA (deg)", "RTA (deg)", "AbsRel", "d<1.25", "Acc",
                   "Comp", "NC"], [[name, *values] for name, values in table_rows(evaluation)])

    quantization = report.get("quantization") or {}
    weight_errors = quantization.get("weight_rel_error") or {}
    if weight_errors:
        doc.heading("Per-layer quantization error")
        doc.figure(plot_layer_errors(weight_errors, figures / "layer_error.png"),
                   "Weight relative error per quantized layer, worst first")
        output_error = quantization.get("output_error_vs_float") or {}
        if output_error:
            doc.table(["output", "rel. L2 vs float (mean)", "rel. L2 vs float (worst)"],
                      [[name, f"{v['rel_l2_mean']:.3e}", f"{v['rel_l2_max']:.3e}"] for name, v in output_error.items()])

    selection = quantization.get("method_selection") or {}
    if selection.get("blocks"):
        _method_selection_section(doc, selection, figures)

    data = load_report_data(out_dir)
    if data is not None and data.get("layers"):
        doc.heading("Activations before and after the transforms")
        doc.para("Inputs of the layers with the strongest channel outliers, captured on the float model over one "
                 "calibration batch: the raw input, after the Hadamard rotation, and after rotation + smoothing "
                 "(QuantVGGT Fig. 3). Top: value histogram (log counts); bottom: channel saliency (max |x| per "
                 "input channel). Smoothing divides activations by factors it multiplies into the weights, so "
                 "compare shapes and max / median ratios across stages, not absolute values.")
        rows = []
        for layer in data["layers"]:
            path = plot_activation_layer(layer, data["arrays"], data["stages"],
                                         figures / f"activations_{layer['index']}.png")
            doc.figure(path, f"{layer['name']}: {layer['source']}")
            rows.append([layer["name"], *(f"{layer['stages'][s]['outlier_ratio']:.1f} / "
                                          f"{layer['stages'][s]['kurtosis']:.1f}" for s in data["stages"])])
        doc.table(["layer", *(f"{s}: max/median, kurtosis" for s in data["stages"])], rows)

    selection_png = out_dir / "calibration" / "selection.png"
    if selection_png.is_file():
        doc.heading("Calibration set")
        doc.figure(selection_png, "Calibration candidates and the selected set (NFDS clusters)")

    parity = report.get("parity") or {}
    if parity.get("outputs"):
        doc.heading("Parity")
        doc.para(f"ONNX Runtime vs the PyTorch model: {'passed' if parity.get('passed') else 'FAILED'}.")
        doc.figure(plot_parity(parity["outputs"], figures / "parity.png"), "Relative L2 per output vs tolerance")
        doc.table(["output", "max abs", "rel. L2", "tolerance", "passed"],
                  [[n, f"{o.get('max_abs', 0):.2e}", f"{o.get('rel_l2', 0):.2e}", f"{o.get('tolerance', 0):.2e}",
                    "yes" if o.get("passed") else "NO"] for n, o in parity["outputs"].items()])

    doc.heading("Sizes and timings")
    doc.table(["artifact", "size"], [list(row) for row in _sizes(out_dir, report)])
    timings = report.get("timings_s") or {}
    if timings:
        doc.figure(plot_timings(timings, figures / "timings.png"), "Seconds per pipeline stage")

    markdown = write_text_atomic(out_dir / "report.md", "\n".join(doc.md))
    page = write_text_atomic(out_dir / "report.html", doc.render_html(title))
    logger.info("report: %s", page)
    return {"html": page, "markdown": markdown, "figures": figures}


def _method_selection_section(doc: _Doc, selection: dict[str, Any], figures: Path) -> None:
    counts = ", ".join(f"{m} {n}" for m, n in (selection.get("layer_counts") or {}).items())
    doc.heading("Method choice (--method auto)")
    doc.para(f"Per {selection.get('granularity')}, the candidate with the lowest {selection.get('criterion')}; "
             f"layers per method: {counts}. Errors are each candidate's, on the whole block; 'layers' lists the "
             "linears that switched to another method (granularity layer).")
    measured = {b: r for b, r in selection["blocks"].items() if r.get("errors")}
    if measured:
        doc.figure(plot_method_selection(selection, figures / "method_selection.png"),
                   "Relative block-output error of each candidate per block; the chosen one ringed")
    candidates = list(selection.get("candidates") or [])
    learned = any(record.get("learned_errors") for record in selection["blocks"].values())
    # Aggregator blocks: the error is the mean of the special (camera + register) tokens' and the patch tokens'.
    by_tokens = any(record.get("token_errors") for record in selection["blocks"].values())
    rows = []
    for block, record in selection["blocks"].items():
        errors = record.get("errors") or {}
        after = record.get("learned_errors") or {}
        switched = {k: v for k, v in (record.get("layers") or {}).items() if v != record["method"]}
        note = ("resumed from the reconstruction checkpoint" if record.get("resumed")
                else ", ".join(f"{k}: {v}" for k, v in switched.items()))
        cells = [f"{errors[m]:.3e}" + (f" / {after[m]:.3e}" if m in after else "") if m in errors else "-"
                 for m in candidates]
        parts = (record.get("token_errors") or {}).get(record["method"])
        split = [f"{parts['special']:.3e} / {parts['patch']:.3e}" if parts else "-"] if by_tokens else []
        rows.append([block, record["method"], *cells, *split, note])
    if learned:
        doc.para("Cells: round-to-nearest error / error after learning the candidate (the criterion).")
    doc.table(["block", "chosen", *candidates, *(["chosen: special / patch tokens"] if by_tokens else []), "layers"],
              rows)


def write_run_report(out_dir: str | Path, float_model: Any, model: Any, batches: list[Any], seed: int,
                     alpha: float) -> dict[str, Path] | None:
    """End of a pipeline run: save the activation statistics, then :func:`write_report`.

    The report is a view of a finished run: a failure here (no matplotlib, a plotting error) is logged and
    leaves the run's artifacts in place; ``qvggt-export report OUT_DIR`` redraws it later.
    """
    from qvggt_export.report.activations import activation_report_data, save_report_data

    try:
        if float_model is not None and batches:
            save_report_data(activation_report_data(float_model, model, batches[0], seed, alpha), out_dir)
        return write_report(out_dir)
    except Exception as exc:  # noqa: BLE001 - see the docstring: never fail a finished run for its report
        logger.warning("report not written (%s); run `qvggt-export report %s` to retry", exc, out_dir)
        return None
