"""The shape of the house: fast --help, a plain checkout importable, one table per concept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_imports_no_torch() -> None:
    # `qvggt-export --help` builds the main parser; it reads the format / method registries and the model
    # presets, none of which needs torch (1.2 s of a 1.25 s --help before, 0.05 s after on this machine).
    result = _run_python("import sys\nfrom qvggt_export.cli import build_parser\n"
                         "text = build_parser().format_help()\n"
                         "assert 'w4a4' in text and 'tiny' in text and 'dsfq' in text, text\n"
                         "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt_rtx', 'tensorrt') "
                         "if m in sys.modules)\n"
                         "print(heavy)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_plain_checkout_imports_remapped_folders() -> None:
    # Without the install's package-dir mapping (editable finders removed), qvggt_export maps calib/, plugins/
    # and engines/ itself.
    result = _run_python(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import qvggt_export.calib, qvggt_export.calib.nfds, qvggt_export.plugins, qvggt_export.engine.profiles as p\n"
        "import qvggt_export.engine.profile_data as d\n"
        "print(qvggt_export.calib.__file__)\nprint(qvggt_export.plugins.__file__)\nprint(d.__file__)\n"
        "print(','.join(p.list_profiles()))")
    assert result.returncode == 0, result.stderr
    calib, plugins, profiles, names = result.stdout.strip().splitlines()
    assert Path(calib) == ROOT / "calib" / "__init__.py"
    assert Path(plugins) == ROOT / "plugins" / "__init__.py"
    assert Path(profiles) == ROOT / "engines" / "__init__.py"  # the data package: JSON profiles, no code
    assert "rtx-default" in names.split(",")


@pytest.mark.parametrize("module", ["qvggt_export.formats", "qvggt_export.methods"])
def test_registries_import_without_torch(module: str) -> None:
    result = _run_python(f"import sys, {module}\nprint('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
