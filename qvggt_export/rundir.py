"""Transactional run folders: a run never mixes with the one before it.

A run writes every artifact into a staging folder beside ``--out`` (``.<name>.staging-<pid>-<id>``, same
parent, so the same filesystem) and replaces the previous folder only when it succeeds, by renaming folders
(an atomic exchange where the kernel offers ``renameat2(RENAME_EXCHANGE)``, two renames otherwise). A run that
fails, is refused or is interrupted removes its staging folder and leaves the previous run byte-identical.

Each finished folder holds ``run.json``: the run id (a uuid4) and every file with its size and sha256.
``report.json`` and ``config.json`` carry the same ``run_id``. The ONNX graphs and the quantized weights do not:
they stay byte-deterministic (same command, same bytes), and the manifest's sha256 binds them to the run just
as well. :func:`verify_run_folder` (used by ``qvggt-export check``) refuses a folder whose files do not match
its manifest.

Resumable files (the block-reconstruction checkpoint) are carried into the staging folder when the previous run
(or a failed run's resume folder, ``.<name>.resume``) used the same configuration, so rerunning the same command
resumes; a failed run keeps its progress in the resume folder, outside the previous run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qvggt_export.errors import QVGGTError

logger = logging.getLogger(__name__)

MANIFEST = "run.json"
# Files that mark a folder as an earlier qvggt-export run (so that replacing it loses nothing of the user's).
RUN_MARKERS = (MANIFEST, "report.json", "config.json")
# Written into a finished folder later by `qvggt-export check`: not part of the run.
NOT_OF_THE_RUN = ("check.json", "eval.json")
# Views drawn from the run's artifacts (qvggt-export report / eval redraw them later): neither listed in the
# manifest nor taken for another run's files.
DERIVED = ("report.html", "report.md", "report/")
# Artifact names a run writes; one of them outside the manifest means the folder mixes runs.
ARTIFACT_SUFFIXES = (".onnx", ".data", ".engine", ".safetensors", ".json")
# Configuration keys that do not change what a resumable file holds.
_NOT_COMPARED = ("progress", "run_id", "out_dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def validate_output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an unusable ``--out`` in the first second: a regular file, a read-only folder, a parent that cannot
    hold the staging folder, ``.``/``..``, or a non-empty folder that is not an earlier run (replacing it would
    delete the user's files). Writes nothing."""
    out = Path(out_dir)
    if out.name in ("", ".", ".."):
        raise QVGGTError(f"--out {out_dir} must name a folder of its own (it is replaced as a whole when the run "
                         "succeeds), e.g. --out out/run1")
    if out.is_symlink():
        raise QVGGTError(f"--out {out} is a symbolic link; pass the folder it points to ({out.resolve()}), which the "
                         "run replaces as a whole")
    if out.exists() and not out.is_dir():
        raise QVGGTError(f"--out {out} is a regular file, not a folder; choose another --out")
    parent = out.parent
    while not parent.exists():  # created when the run starts
        parent = parent.parent
    if not parent.is_dir():
        raise QVGGTError(f"--out {out}: {parent} is a regular file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QVGGTError(f"--out {out}: folder {parent} is not writable (the run stages its files beside --out)")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise QVGGTError(f"output folder {out} is not writable")
        entries = sorted(p.name for p in out.iterdir())
        if entries and not any(name in entries for name in RUN_MARKERS):
            shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
            raise QVGGTError(f"output folder {out} holds files that are not from a qvggt-export run ({shown}); a "
                             "run replaces its folder as a whole: choose an empty or new --out")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _derived(name: str) -> bool:
    return any(name == d or (d.endswith("/") and name.startswith(d)) for d in DERIVED)


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _NOT_COMPARED}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link is enough: every writer replaces files by rename, never in place.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class RunFolder:
    """One run's staging folder; :meth:`commit` puts it in place of ``out_dir``, :meth:`abort` removes it.

    Args:
        out_dir: the final folder (``--out``).
        config: the run's configuration as JSON data (resumable files are carried only between equal ones).
        resumable: names of files a failed or finished run passes on to the same command's next run.
    """

    def __init__(self, out_dir: str | os.PathLike[str], config: Mapping[str, Any],
                 resumable: Iterable[str] = ()) -> None:
        self.out_dir = validate_output_folder(out_dir)
        self.config = dict(config)
        self.resumable = tuple(resumable)
        self.run_id = uuid.uuid4().hex
        parent = self.out_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_dead_siblings()
        self.staging = parent / f".{self.out_dir.name}.staging-{os.getpid()}-{self.run_id[:12]}"
        self.resume_dir = parent / f".{self.out_dir.name}.resume"
        try:
            self.staging.mkdir()
        except OSError as exc:
            raise QVGGTError(f"cannot create the staging folder {self.staging} beside --out: "
                             f"{exc.strerror or exc}") from exc
        self._carried = self._carry_resumable()

    def _remove_dead_siblings(self) -> None:
        """Staging folders of runs that were killed (their process is gone) are removed."""
        prefix = f".{self.out_dir.name}.staging-"
        for path in self.out_dir.parent.glob(prefix + "*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
                logger.info("removing %s, left by a killed run", path)
                shutil.rmtree(path, ignore_errors=True)

    def _carry_resumable(self) -> dict[str, str]:
        carried: dict[str, str] = {}
        wanted = _comparable(self.config)
        for folder in (self.resume_dir, self.out_dir):
            previous = _read_json(folder / "config.json")
            if not isinstance(previous, dict) or _comparable(previous) != wanted:
                continue
            for name in self.resumable:
                if name not in carried and (folder / name).is_file():
                    _link_or_copy(folder / name, self.staging / name)
                    carried[name] = _sha256(self.staging / name)
                    logger.info("resuming from %s", folder / name)
        return carried

    def abort(self) -> None:
        """Remove the staging folder; resumable progress it made goes to the resume folder."""
        progressed = [name for name in self.resumable if (self.staging / name).is_file()
                      and _sha256(self.staging / name) != self._carried.get(name)]
        if progressed:
            with contextlib.suppress(OSError):
                self.resume_dir.mkdir(exist_ok=True)
                for name in progressed:
                    os.replace(self.staging / name, self.resume_dir / name)
                (self.resume_dir / "config.json").write_text(json.dumps(self.config, indent=2, default=str) + "\n")
                logger.warning("the run did not finish; its %s is kept in %s: the same command resumes from it",
                               ", ".join(progressed), self.resume_dir)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _rewrite_paths(self) -> None:
        """Paths written during the run name the staging folder: make them name ``out_dir``."""
        staged, final = str(self.staging), str(self.out_dir)
        for path in _files(self.staging):
            if path.suffix not in (".json", ".md", ".csv", ".txt", ".log"):
                continue
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            if staged in text:
                path.write_text(text.replace(staged, final), encoding="utf-8", errors="surrogateescape")

    def _stamp(self, name: str) -> None:
        path = self.staging / name
        data = _read_json(path)
        if isinstance(data, dict):
            data["run_id"] = self.run_id
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")

    def commit(self) -> dict[str, Any]:
        """Stamp the run id, write ``run.json``, put the staging folder in place of ``out_dir``; returns the
        final ``report.json`` (paths naming ``out_dir``), or ``{}`` if the run wrote none."""
        self._rewrite_paths()
        for name in ("report.json", "config.json"):
            self._stamp(name)
        files = {p.relative_to(self.staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in _files(self.staging) if not _derived(p.relative_to(self.staging).as_posix())}
        manifest = {"run_id": self.run_id, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": files}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in [self.staging, *self.staging.rglob("*")]:
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        old = self._swap()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        report = _read_json(self.out_dir / "report.json")
        return report if isinstance(report, dict) else {}

    def _swap(self) -> Path | None:
        if not self.out_dir.exists():
            os.rename(self.staging, self.out_dir)
            return None
        if _exchange(self.staging, self.out_dir):
            return self.staging  # now holds the previous run
        old = self.out_dir.parent / f".{self.out_dir.name}.old-{self.run_id[:12]}"
        os.rename(self.out_dir, old)
        os.rename(self.staging, self.out_dir)
        return old


def verify_run_folder(folder: str | os.PathLike[str]) -> str | None:
    """Check that every file of a finished run folder belongs to one run; returns the run id.

    Raises:
        QVGGTError: a file listed in ``run.json`` is missing or differs (size or sha256), an artifact is not
            listed, or ``report.json`` / ``config.json`` name another run. A folder without ``run.json`` (written
            by a version before run manifests) is accepted with a warning (``None``).
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        logger.warning("%s has no %s (an older qvggt-export): cannot check that its files belong to one run",
                       folder, MANIFEST)
        return None
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "run_id" not in manifest:
        raise QVGGTError(f"{manifest_path} is not a run manifest (unreadable JSON or no run_id/files)")
    run_id, files = manifest["run_id"], manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise QVGGTError(f"{folder} does not hold one run: {name} of run {run_id} is missing; rerun "
                             "qvggt-export into this folder")
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            raise QVGGTError(f"{folder} mixes runs: {name} is not the file run {run_id} wrote (size or sha256 "
                             f"differs from {MANIFEST}); rerun qvggt-export into this folder")
    for path in _files(folder):
        name = path.relative_to(folder).as_posix()
        if (name in files or name == MANIFEST or name in NOT_OF_THE_RUN or _derived(name)
                or path.suffix not in ARTIFACT_SUFFIXES):
            continue
        raise QVGGTError(f"{folder} mixes runs: {name} is not part of run {run_id} ({MANIFEST}); remove it or "
                         "rerun qvggt-export into this folder")
    for name in ("report.json", "config.json"):
        data = _read_json(folder / name)
        if isinstance(data, dict) and data.get("run_id") not in (None, run_id):
            raise QVGGTError(f"{folder} mixes runs: {name} belongs to run {data['run_id']}, {MANIFEST} to {run_id}")
    return str(run_id)
