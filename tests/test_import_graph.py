"""Dependencies between stages point one way (STYLE.md): checked on the source with ``ast``, no imports run.

Stages: model, calib, quant, export, parity, engine, plugins, plus the CLI and the pipeline above them. The
shared modules (errors, io, formats, methods, onnxrt, the package ``__init__``) belong to no stage and may be
imported by any.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> stage; calib/, plugins/ and engines/ install as qvggt_export.calib, .plugins, .engine.profile_data
# (engines/ holds data: build profiles read by qvggt_export.engine.profiles).
FOLDERS = {ROOT / "calib": "calib", ROOT / "plugins": "plugins", ROOT / "engines": "engine"}
STAGES = ("model", "calib", "quant", "export", "parity", "engine", "plugins", "pipeline", "cli")
# Lazy (function-level) imports that close a loop, and why they are acceptable: the Hadamard plugin registers
# its creator through the engine's TensorRT loader, and the engine runtime registers the plugin when an engine
# needs it; neither is imported at module level, so importing either package never imports the other.
ALLOWED_LAZY_LOOPS = {frozenset({"engine", "plugins"})}


def _stage_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "qvggt_export" or len(parts) < 2:
        return None
    stage = parts[1]
    return stage if stage in STAGES else None


def _stage_of_file(path: Path) -> str | None:
    for folder, stage in FOLDERS.items():
        if folder in path.parents:
            return stage
    relative = path.relative_to(ROOT / "qvggt_export")
    name = relative.parts[0].removesuffix(".py")
    return name if name in STAGES else None


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path)
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, id(node) in top_level
            for alias in node.names:  # `from qvggt_export import parity` names a stage too
                yield f"{module}.{alias.name}", id(node) in top_level


def _package_of(path: Path) -> str:
    for folder, stage in FOLDERS.items():
        if folder in path.parents:
            prefix = {"calib": "qvggt_export.calib", "plugins": "qvggt_export.plugins",
                      "engine": "qvggt_export.engine.profile_data"}[stage]
            inner = path.parent.relative_to(folder).parts
            return ".".join([prefix, *inner])
    return ".".join(path.parent.relative_to(ROOT).parts)


def _edges(module_level_only: bool) -> dict[tuple[str, str], list[str]]:
    files = [*sorted((ROOT / "qvggt_export").rglob("*.py"))]
    for folder in FOLDERS:
        files += sorted(folder.rglob("*.py"))
    edges: dict[tuple[str, str], list[str]] = {}
    for path in files:
        source = _stage_of_file(path)
        if source is None:
            continue
        for module, top in _imports(path):
            target = _stage_of_module(module)
            if target is None or target == source or (module_level_only and not top):
                continue
            edges.setdefault((source, target), []).append(f"{path.relative_to(ROOT)} imports {module}")
    return edges


def _cycles(edges: dict[tuple[str, str], list[str]]) -> list[tuple[str, str]]:
    """Pairs of stages that reach each other."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {stage: reach(stage) for stage in STAGES}
    return sorted((a, b) for a in STAGES for b in STAGES if a < b and b in reachable[a] and a in reachable[b])


def test_the_graph_is_read() -> None:
    # The checker itself: it must see the known edges, or every other test here passes vacuously.
    edges = _edges(module_level_only=False)
    assert ("export", "quant") in edges and ("pipeline", "engine") in edges and ("calib", "quant") in edges


def test_module_level_imports_have_no_cycle() -> None:
    edges = _edges(module_level_only=True)
    assert _cycles(edges) == [], {pair: edges.get(pair, []) + edges.get(pair[::-1], []) for pair in _cycles(edges)}


def test_no_cycle_between_stages_counting_lazy_imports() -> None:
    edges = _edges(module_level_only=False)
    loops = [pair for pair in _cycles(edges) if frozenset(pair) not in ALLOWED_LAZY_LOOPS]
    assert loops == [], {pair: edges.get(pair, []) + edges.get(pair[::-1], []) for pair in loops}


@pytest.mark.parametrize("forbidden", ["parity", "engine", "plugins", "pipeline", "cli"])
def test_export_knows_no_runtime(forbidden: str) -> None:
    assert _edges(module_level_only=False).get(("export", forbidden), []) == []


@pytest.mark.parametrize("stage", ["model", "calib", "quant", "export", "parity", "engine", "plugins"])
def test_nothing_below_the_cli_imports_it(stage: str) -> None:
    edges = _edges(module_level_only=False)
    assert edges.get((stage, "cli"), []) == [] and edges.get((stage, "pipeline"), []) == []


def test_model_knows_no_quantization() -> None:
    edges = _edges(module_level_only=False)
    assert [target for (source, target) in edges if source == "model"] == []
