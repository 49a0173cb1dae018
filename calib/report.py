"""Human-readable views of an NFDS selection: a table (Markdown or CSV) and a PNG plot.

The plot projects the candidates' correlation vectors (eq. 12) to 2-D with PCA (numpy SVD), colours
them by K-Means cluster, marks candidates dropped by the noise filter with an ``x`` and circles the
selected ones. It needs matplotlib (Agg backend, no display); without it the plot is skipped with a
logged warning and the tables are still written.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from qvggt_export.errors import QVGGTError
from qvggt_export.io import write_text_atomic

from .nfds import CalibrationSelection

logger = logging.getLogger(__name__)

__all__ = ["pca_2d", "plot_selection", "selection_table", "write_selection_report"]

TABLE_FORMATS = ("markdown", "csv")


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ``[N, d]`` vectors onto their first two principal axes.

    Returns:
        ``[N, 2]`` coordinates (a missing second axis, for ``d == 1`` or a degenerate set, is 0) and the
        fraction of variance each axis explains (``[2]``).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise QVGGTError(f"PCA needs a non-empty [N, d] array, got shape {x.shape}")
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    axes = min(2, vt.shape[0])
    coords = np.zeros((x.shape[0], 2))
    coords[:, :axes] = centred @ vt[:axes].T
    energy = singular**2
    explained = np.zeros(2)
    if energy.sum() > 0:
        explained[:axes] = energy[:axes] / energy.sum()
    return coords, explained


def _rows(selection: CalibrationSelection) -> list[dict[str, object]]:
    chosen = set(selection.selected_indices)
    rows = []
    for i, cid in enumerate(selection.candidate_ids):
        row: dict[str, object] = {
            "index": i,
            "id": cid,
            "score": None if selection.scores is None else float(selection.scores[i]),
            "kept": bool(selection.kept[i]),
            "cluster": None if selection.labels is None or selection.labels[i] < 0 else int(selection.labels[i]),
            "selected": i in chosen,
        }
        if selection.vectors is not None and selection.vector_kind == "correlation":
            for t, value in enumerate(selection.vectors[i], start=1):
                row[f"c_{t}"] = float(value)
        rows.append(row)
    return rows


def _summary(selection: CalibrationSelection) -> list[str]:
    config = selection.config
    n = len(selection.candidate_ids)
    lines = [
        f"- strategy: **{selection.strategy}**, budget {config.budget}, seed {config.seed}",
        f"- candidates: {n}" + (f" ({len(selection.skipped)} skipped as unreadable)" if selection.skipped else ""),
    ]
    if selection.strategy in ("filtered", "nfds"):
        lines.append(f"- noise filter: p = {config.p} (drop the top {config.p:.0%} scores), "
                     f"kept {int(selection.kept.sum())} of {n}")
    if selection.labels is not None:
        sizes = Counter(int(c) for c in selection.labels if c >= 0)
        picked = Counter(int(selection.labels[i]) for i in selection.selected_indices)
        per_cluster = ", ".join(f"{c}: {picked.get(c, 0)}/{sizes[c]}" for c in sorted(sizes))
        lines.append(f"- K-Means: K = {selection.k_used} (requested {config.k}); selected/size per cluster: "
                     f"{per_cluster}")
    if "statistics_s" in selection.timing:
        lines.append(f"- statistics pass: {selection.timing['statistics_s']:.2f} s "
                     f"({selection.timing['per_candidate_s']:.3f} s per candidate)")
    lines += [f"- note: {note}" for note in selection.notes]
    return lines


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def selection_table(selection: CalibrationSelection, fmt: str = "markdown") -> str:
    """One row per candidate: id, outlier score, kept by the filter, cluster, selected, correlation vector.

    Args:
        selection: The selection to show.
        fmt: ``"markdown"`` (with a summary above the table) or ``"csv"`` (plain rows, full precision).
    """
    if fmt not in TABLE_FORMATS:
        raise QVGGTError(f"table format must be one of {TABLE_FORMATS}, got {fmt!r}")
    rows = _rows(selection)
    columns = list(rows[0]) if rows else ["index", "id", "score", "kept", "cluster", "selected"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue()
    lines = ["# NFDS calibration selection", "", *_summary(selection), ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [_fmt(row[c]).replace("|", "\\|") for c in columns]
        if row["selected"]:
            cells[1] = f"**{cells[1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_selection(selection: CalibrationSelection, path: str | os.PathLike[str]) -> Path | None:
    """Write the PCA plot of the correlation vectors as PNG; ``None`` (with a warning) if it cannot be drawn.

    It is skipped when matplotlib is missing or the selection has no vectors (``"random"`` runs no model).
    """
    if selection.vectors is None or len(selection.candidate_ids) == 0:
        logger.warning("no correlation vectors in this %r selection: plot skipped", selection.strategy)
        return None
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: selection plot skipped (pip install matplotlib)")
        return None
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    coords, explained = pca_2d(selection.vectors)
    labels = selection.labels if selection.labels is not None else np.zeros(len(coords), dtype=np.int64)
    kept = np.asarray(selection.kept, dtype=bool)
    chosen = np.zeros(len(coords), dtype=bool)
    chosen[selection.selected_indices] = True

    # An Agg canvas attached to a bare Figure: no pyplot, no global backend switch, safe in a library.
    figure = Figure(figsize=(6.4, 5.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab10" if labels.max(initial=0) < 10 else "tab20"]
    for label in sorted(set(labels[kept].tolist())):
        members = kept & (labels == label)
        name = f"cluster {label}" if selection.labels is not None else "kept"
        axes.scatter(coords[members, 0], coords[members, 1], s=28, color=colours(label % colours.N), label=name)
    if (~kept).any():
        axes.scatter(coords[~kept, 0], coords[~kept, 1], marker="x", s=40, color="0.35", label="filtered out")
    axes.scatter(coords[chosen, 0], coords[chosen, 1], s=140, facecolors="none", edgecolors="black", linewidths=1.4,
                 label="selected")
    kind = "correlation vectors (eq. 12)" if selection.vector_kind == "correlation" else "pooled frame features"
    axes.set_title(f"NFDS {selection.strategy}: {len(selection.selected_indices)} of "
                   f"{len(selection.candidate_ids)} candidates\nPCA of {kind}", fontsize=10)
    axes.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    axes.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    from qvggt_export.io import atomic_write

    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    return path


def write_selection_report(selection: CalibrationSelection, out_dir: str | os.PathLike[str], *,
                           plot: bool = True) -> dict[str, Path]:
    """Write ``selection.md``, ``selection.csv`` and (if possible) ``selection.png`` into ``out_dir``.

    Returns:
        The written files by kind (``"markdown"``, ``"csv"``, ``"plot"``).
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "selection.md", "csv": out / "selection.csv"}
    write_text_atomic(written["markdown"], selection_table(selection, "markdown"))
    write_text_atomic(written["csv"], selection_table(selection, "csv"))
    if plot:
        png = plot_selection(selection, out / "selection.png")
        if png is not None:
            written["plot"] = png
    return written
