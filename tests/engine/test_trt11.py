"""TensorRT 11 compatibility: no removed precision builder flag anywhere, strong typing on 10.x and 11.x.

TensorRT 11 removed weak typing and with it the precision builder flags (``BuilderFlag.FP16``, ``INT8``...);
an engine's precisions come from the strongly typed ONNX graph. A reference to a removed flag raises
``AttributeError`` only when that line runs on TensorRT 11 (on a GPU host), so the source is scanned here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from qvggt_export.engine.backend import REMOVED_PRECISION_FLAGS, Backend
from qvggt_export.errors import QVGGTError

REPO = Path(__file__).resolve().parents[2]
# Everything that ships or builds engines: the package, the stage folders mapped into it, and the benchmarks.
SCANNED = ("qvggt_export", "calib", "plugins", "engines", "benchmarks")
# getattr(trt.BuilderFlag, "FP16") or a flag name built as a string next to BuilderFlag.
_STRING_FORM = re.compile(r"BuilderFlag\W{1,4}(" + "|".join(REMOVED_PRECISION_FLAGS) + r")\b")


def removed_flag_references(source: str, filename: str = "<source>") -> list[str]:
    """``file:line name`` for each reference to a removed precision flag of ``BuilderFlag``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Attribute) or node.attr not in REMOVED_PRECISION_FLAGS:
            continue
        owner = node.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if owner_name == "BuilderFlag":
            found.append(f"{filename}:{node.lineno} BuilderFlag.{node.attr}")
    for match in _STRING_FORM.finditer(source):
        line = source.count("\n", 0, match.start()) + 1
        entry = f"{filename}:{line} BuilderFlag.{match.group(1)}"
        if entry not in found:
            found.append(entry)
    return found


def test_scanner_finds_removed_flags():
    """The scan below would report a use (it is not a check that cannot fail)."""
    snippet = (
        "import tensorrt as trt\n"
        "config.set_flag(trt.BuilderFlag.FP16)\n"
        "from tensorrt import BuilderFlag\n"
        "config.set_flag(BuilderFlag.INT8)\n"
        "flag = getattr(trt.BuilderFlag, 'FP8')\n"
        "config.set_flag(trt.BuilderFlag.TF32)\n"  # not removed: must not be reported
    )
    assert removed_flag_references(snippet) == [
        "<source>:2 BuilderFlag.FP16",
        "<source>:4 BuilderFlag.INT8",
        "<source>:5 BuilderFlag.FP8",
    ]


def test_no_removed_precision_flag_is_referenced():
    files = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20, f"expected the package sources under {REPO}, found {len(files)} files"
    found = []
    for path in files:
        found += removed_flag_references(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert found == [], "TensorRT 11 removed these builder flags (use strong typing, FP16 via the graph): " + ", ".join(
        found
    )


def _fake_backend(name: str, version: str, creation_flags: dict[str, int]) -> Backend:
    flags = SimpleNamespace(__members__=creation_flags, **creation_flags)
    module = SimpleNamespace(NetworkDefinitionCreationFlag=flags)
    return Backend(name=name, trt=module, version=version)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "version", "creation_flags", "expected"),
    [
        ("trt", "10.13.0", {"STRONGLY_TYPED": 5}, 1 << 5),
        ("trt", "11.0.0", {"STRONGLY_TYPED": 5}, 1 << 5),  # kept as a no-op flag
        ("trt", "11.0.0", {}, 0),  # or gone: every network is strongly typed
        ("rtx", "1.7.1", {"STRONGLY_TYPED": 0}, 1),
    ],
)
def test_strongly_typed_network_flags(name, version, creation_flags, expected):
    assert _fake_backend(name, version, creation_flags).network_flags(True) == expected


def test_weak_typing_refused_on_tensorrt_11_kept_on_10():
    assert _fake_backend("trt", "10.13.0", {"STRONGLY_TYPED": 5}).network_flags(False) == 0
    for backend in (_fake_backend("trt", "11.0.0", {"STRONGLY_TYPED": 5}), _fake_backend("trt", "11.1.0", {})):
        assert not backend.supports_weak_typing
        with pytest.raises(QVGGTError, match="strongly typed networks only"):
            backend.network_flags(False)


def test_installed_rtx_backend_builds_strongly_typed():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    from qvggt_export.engine.backend import load_backend

    backend = load_backend("rtx")
    assert backend.network_flags(True) == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # The precision flags are already absent from TensorRT-RTX, as from TensorRT 11.
    assert not set(REMOVED_PRECISION_FLAGS) & set(trt.BuilderFlag.__members__)
