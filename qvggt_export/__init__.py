"""qvggt-export: post-training quantization (QuantVGGT) and ONNX / TensorRT export of VGGT.

Stages (one module each): :mod:`qvggt_export.model` (VGGT), :mod:`qvggt_export.calib` (data),
:mod:`qvggt_export.quant` (quantization), :mod:`qvggt_export.export` (ONNX), :mod:`qvggt_export.parity`
(ONNX Runtime vs PyTorch), :mod:`qvggt_export.engine` (TensorRT / TensorRT-RTX), and
:func:`qvggt_export.pipeline.run_pipeline` running them all. Importing this package imports no GPU or
TensorRT module.
"""

__version__ = "0.1.0"

import logging as _logging

# A library never configures logging; this only keeps Python's last-resort handler from printing
# messages (e.g. TensorRT's) that an application did not ask to see.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def _map_checkout_folders() -> None:
    """In a source checkout run without installing (``PYTHONPATH=.``), import ``qvggt_export.calib``,
    ``qvggt_export.plugins`` and ``qvggt_export.engine.profile_data`` from the top-level ``calib/``, ``plugins/``
    and ``engines/`` folders, as ``pyproject.toml``'s package-dir mapping does for installs.

    A finder appended to ``sys.meta_path`` that answers for those three names only, and only when this file
    sits in a checkout (a ``pyproject.toml`` naming qvggt-export beside the package); installed copies
    (wheel or editable) find the folders through their own mapping first and never reach it.
    """
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if 'name = "qvggt-export"' not in pyproject.read_text(encoding="utf-8"):
            return
    except OSError:
        return
    folders = {"qvggt_export.calib": root / "calib", "qvggt_export.plugins": root / "plugins",
               "qvggt_export.engine.profile_data": root / "engines"}

    class _CheckoutFolders(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
            folder = folders.get(fullname)
            if folder is None or not (folder / "__init__.py").is_file():
                return None
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(finder).__name__ == "_CheckoutFolders" for finder in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders())


_map_checkout_folders()
