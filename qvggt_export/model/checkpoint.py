"""Loading VGGT weights: the official ``model.pt``, safetensors files, and the local Hugging Face cache.

Nothing here downloads. ``torch.load`` always runs with ``weights_only=True`` (no pickled code is
executed); safetensors files are read with the safetensors library. Key mismatches raise a
:class:`QVGGTError` that lists what is missing and what is unexpected, before the model is touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qvggt_export.errors import QVGGTError

logger = logging.getLogger(__name__)

HF_REPO_FILES = ("model.safetensors", "model.pt")
KNOWN_HF_REPOS = ("facebook/VGGT-1B", "facebook/VGGT-1B-Commercial")
_LISTED_KEYS = 12


def _hf_cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return roots


def find_hf_checkpoint(repo_id: str) -> Path | None:
    """The cached weight file of ``repo_id`` (e.g. ``facebook/VGGT-1B``) in the local Hugging Face cache,
    or ``None``. Reads the cache layout directly (``models--org--name/snapshots/<rev>/``), offline."""
    folder = "models--" + repo_id.replace("/", "--")
    for root in _hf_cache_roots():
        repo_dir = root / folder
        if not repo_dir.is_dir():
            continue
        snapshots = []
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snapshots.append(repo_dir / "snapshots" / ref.read_text().strip())
        snapshot_root = repo_dir / "snapshots"
        if snapshot_root.is_dir():
            snapshots += sorted(snapshot_root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snapshot in snapshots:
            for name in HF_REPO_FILES:
                if (snapshot / name).is_file():
                    return snapshot / name
    return None


def resolve_checkpoint_path(source: str | os.PathLike[str]) -> Path:
    """A file, a folder holding ``model.safetensors``/``model.pt``, or a cached Hugging Face repo id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in HF_REPO_FILES:
            if (path / name).is_file():
                return path / name
        raise QVGGTError(f"checkpoint folder {path} holds none of {', '.join(HF_REPO_FILES)}")
    source = str(source)
    if source.count("/") == 1 and not path.suffix:
        cached = find_hf_checkpoint(source)
        if cached is not None:
            return cached
        raise QVGGTError(
            f"checkpoint {source!r} is neither a file nor a repo in the local Hugging Face cache "
            f"(looked in {', '.join(str(r) for r in _hf_cache_roots())}). This tool never downloads: fetch it "
            f"yourself, e.g. `huggingface-cli download {source}`, or pass the path to model.pt/model.safetensors")
    raise QVGGTError(f"checkpoint not found: {path}")


def checkpoint_kind(source: str | os.PathLike[str]) -> tuple[Path, str]:
    """Resolve ``source`` and tell from its first bytes what it is, without loading it: ``"safetensors"`` or
    ``"torch-zip"``; anything else is a one-line :class:`QVGGTError` naming the file and the likely cause (empty
    file, legacy pickle refused for safety, not a checkpoint)."""
    path = resolve_checkpoint_path(source)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise QVGGTError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise QVGGTError(f"checkpoint {path} is an empty file (0 bytes): an interrupted download or copy?")
    if head.startswith(b"PK\x03\x04"):
        return path, "torch-zip"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        return path, "safetensors"
    if head[:1] == b"\x80" and path.suffix != ".safetensors":
        raise QVGGTError(f"checkpoint {path} is a legacy pickled PyTorch file (not torch's zip format): refused "
                         "for safety, since unpickling can run code; convert it to safetensors where you trust it "
                         "(load it with the code that wrote it, then safetensors.torch.save_file(state_dict, "
                         "'model.safetensors'))")
    what = "a safetensors file" if path.suffix == ".safetensors" else "a checkpoint (safetensors or torch zip)"
    raise QVGGTError(f"checkpoint {path} is not {what}: its first bytes are {head[:8]!r}")


def load_state_dict_file(source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or PyTorch file, without executing pickled code."""
    path, kind = checkpoint_kind(source)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise QVGGTError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:  # torch's text advises weights_only=False, which this tool never does
            raise QVGGTError(f"checkpoint {path} holds pickled Python objects besides tensors (e.g. a whole model): "
                             "refused for safety, since unpickling can run code; save its state_dict() to "
                             "safetensors where you trust it") from exc
        except Exception as exc:  # torch raises RuntimeError/EOFError/... for damaged archives
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            raise QVGGTError(f"cannot read PyTorch checkpoint {path}: corrupt or truncated zip archive "
                             f"({first})") from exc
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            if set(state) == {wrapper} and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise QVGGTError(f"checkpoint {path} does not hold a state dict (found {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise QVGGTError(f"checkpoint {path} has non-tensor entries: {bad[:_LISTED_KEYS]}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = f" ... (+{len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a :class:`QVGGTError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_listing(mismatched)}")
        raise QVGGTError(f"{source} does not match the model ({'; '.join(parts)}). "
                         "Is the model config (preset) the one these weights were trained with?")


def load_checkpoint(model: nn.Module, source: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load weights into ``model`` in place (strict) and return it.

    Args:
        model: a VGGT built with the matching config (a ``meta``-device model is materialised).
        source: a path to ``model.pt``/``*.safetensors``, a folder holding one, a Hugging Face repo id
            already in the local cache (e.g. ``"facebook/VGGT-1B"``), or a state dict.
    """
    if isinstance(source, Mapping):
        state, label = dict(source), "state dict"
    else:
        label = str(resolve_checkpoint_path(source))
        state = load_state_dict_file(source)
    check_state_dict(model, state, label)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    logger.info("loaded %d tensors from %s", len(state), label)
    return model
