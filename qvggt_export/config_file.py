"""``--config FILE``: a run's configuration from TOML or JSON, with command-line flags on top.

The file holds :class:`~qvggt_export.pipeline.PipelineConfig` fields by name, flat (``bits = "w4a4"``,
``calib_size = 40``, ``out_dir = "out/w4a4"``); a run's own ``config.json`` is such a file, so
``qvggt-export --config out/w4a4/config.json`` reproduces that run. Dashes are accepted for underscores
(``calib-size``). Every problem of the file is reported at once in one error: unknown keys (with the
closest valid name, from :mod:`difflib`), values of the wrong type, a file that does not parse. Range checks
are :class:`PipelineConfig`'s own, after the merge.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

from qvggt_export.errors import QVGGTError

SUFFIXES = (".toml", ".json")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key/value table of a ``.toml`` or ``.json`` file (not yet validated)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise QVGGTError(f"config file {path}: expected a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QVGGTError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, json.JSONDecodeError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise QVGGTError(f"config file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise QVGGTError(f"config file {path}: expected a table of settings, got {type(data).__name__}")
    return data


# Keys a run's config.json carries beside the settings (qvggt_export.rundir stamps the run id into it), skipped
# so that the file reproduces the run.
RUN_RECORD_KEYS = ("run_id",)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (from TOML / JSON) fits a field annotated ``annotation`` (str, int, float, bool, Path,
    ``X | None``)."""
    if isinstance(annotation, str):  # from __future__ annotations: evaluate the simple names used by configs
        annotation = eval(annotation, {"Path": Path, "Any": Any})  # noqa: S307 - our own dataclass's annotations
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if origin is tuple:  # tuple[X, ...]: a TOML / JSON array of X
        (item, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list | tuple) and all(_accepts(item, v) for v in value)
    return True


def validate_settings(data: dict[str, Any], config_type: type, source: str) -> dict[str, Any]:
    """Check every key and value of ``data`` against the fields of the dataclass ``config_type``.

    Returns:
        The settings keyed by field name (dashes turned into underscores).

    Raises:
        QVGGTError: listing every unknown key (with the closest valid name) and every mistyped value.
    """
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    errors, settings = [], {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in RUN_RECORD_KEYS:  # a run's config.json names its run; not a setting of the next one
            continue
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if not _accepts(fields[name].type, value):
            errors.append(f"{key} = {value!r}: expected {fields[name].type}")
            continue
        settings[name] = value
    if errors:
        raise QVGGTError(f"config file {source}: {len(errors)} problem{'s' if len(errors) > 1 else ''}: "
                         + "; ".join(errors) + f". Valid keys: {', '.join(fields)}")
    return settings


def merge_settings(path: str | Path | None, flags: dict[str, Any], explicit: set[str], config_type: type
                   ) -> dict[str, Any]:
    """Defaults (from ``flags``), then the file, then the flags given on the command line (``explicit``)."""
    if path is None:
        return dict(flags)
    settings = validate_settings(read_config_file(path), config_type, str(path))
    merged = dict(flags)
    merged.update(settings)
    merged.update({name: value for name, value in flags.items() if name in explicit})
    return merged
