#!/usr/bin/env bash
# Build the engine-builder image (docker/Dockerfile.rtx) with podman and run the quick start inside it.
#
#   sudo docker/build_and_test.sh            # from the repository root; needs root (apt-get, debootstrap, podman)
#
# Follows ../shared/CONTAINERS.md: no registry is reachable on this project's machines, so the Debian base is
# bootstrapped locally and tagged as the Dockerfile's default base (debian:bookworm-slim); podman builds with
# --isolation chroot and runs with runc. Then, in a container with no network and a host folder mounted at /out:
#   qvggt-export --bits w4a4 --out /out --no-progress
# and checks on the host that /out holds the engine and a report.json with passing parity and an engine.
# Writes docker/results/builder_image.md (date, build seconds, image size, quick-start seconds, the checks),
# also when a step fails (with the failing step and the end of its log). Removes its images at the end.
#
# Environment: WORK (scratch folder, default /tmp/qvggt-docker), KEEP_IMAGES=1 to skip the clean-up.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/qvggt-docker}"
IMAGE=localhost/qvggt-export:builder
BASE=localhost/debian:bookworm
RESULTS="$REPO/docker/results/builder_image.md"
LOGS="$WORK/logs"
TORCH_VERSION=2.13.0
PODMAN_RUN=(podman --runtime runc run --rm --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)

mkdir -p "$WORK" "$LOGS" "$(dirname "$RESULTS")"
declare -A FIGURES=()
CHECKS=()
STEP=setup

write_results() {  # $1: "passed" or "FAILED"
    local status="$1"
    {
        echo "# Engine-builder image: podman build and quick start in a container"
        echo
        echo "Written by \`docker/build_and_test.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') ($(nproc) CPU cores shared" \
             "with other jobs, $(podman --version 2>/dev/null || echo 'podman: not installed'))."
        echo
        echo "**Result: $status**$( [ "$status" = passed ] || echo " at step \`$STEP\`")"
        echo
        echo "| figure | value |"
        echo "|---|---|"
        for key in base_image build_seconds image_size_mb quick_start_command quick_start_seconds engine_mb \
                   images_left_after_cleanup; do
            [ -n "${FIGURES[$key]:-}" ] && echo "| $key | ${FIGURES[$key]} |"
        done
        echo
        if [ "${#CHECKS[@]}" -gt 0 ]; then
            echo "Checks on the host (the mounted /out):"
            echo
            printf -- '- %s\n' "${CHECKS[@]}"
            echo
        fi
        if [ "$status" != passed ] && [ -f "$LOGS/$STEP.log" ]; then
            echo "End of the \`$STEP\` log:"
            echo
            echo '```'
            tail -n 40 "$LOGS/$STEP.log"
            echo '```'
        fi
    } > "$RESULTS.tmp"
    mv "$RESULTS.tmp" "$RESULTS"
}

remove_images() {  # the builder, the base and dangling layers; records what is left
    if [ "${KEEP_IMAGES:-0}" = 1 ] || ! command -v podman > /dev/null; then
        return
    fi
    {
        for name in "$IMAGE" docker.io/library/debian:bookworm-slim "$BASE"; do
            podman image exists "$name" && podman rmi -f "$name"
        done
        podman image prune -f
        podman system prune -f
        podman images -a
    } >> "$LOGS/cleanup.log" 2>&1 || true
    local left
    left=$(podman images -a --format '{{.Repository}}:{{.Tag}}' 2> /dev/null | grep -c -E 'qvggt-export|debian' || true)
    FIGURES[images_left_after_cleanup]="$left (podman rmi + podman system prune)"
}

cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        remove_images
        write_results FAILED
        echo "build_and_test.sh: FAILED at step $STEP (see $RESULTS, $LOGS/$STEP.log)" >&2
    fi
    rm -rf "$WORK/rootfs" "$REPO/docker/wheelhouse/torch-"*.whl
}
trap cleanup EXIT

run_step() {  # run_step NAME command...: output to $LOGS/NAME.log
    STEP="$1"
    shift
    echo "== $STEP" >&2
    "$@" > "$LOGS/$STEP.log" 2>&1
}

# 1. Tools.
if ! command -v podman > /dev/null || ! command -v runc > /dev/null || ! command -v debootstrap > /dev/null; then
    run_step install_tools bash -c "apt-get update && apt-get install -y podman runc debootstrap"
fi

# 2. The Debian base, bootstrapped locally (the proxy's CA trusted inside, for apt and pip during the build).
if ! podman image exists "$BASE"; then
    rm -rf "$WORK/rootfs"
    run_step debootstrap debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian
    STEP=trust_proxy_ca
    mkdir -p "$WORK/rootfs/usr/local/share/ca-certificates" "$WORK/rootfs/etc/ssl/certs"
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2> /dev/null || true
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/"
    run_step import_base bash -c "tar -C '$WORK/rootfs' -c . | podman import - '$BASE'"
    rm -rf "$WORK/rootfs"
fi
podman tag "$BASE" docker.io/library/debian:bookworm-slim
FIGURES[base_image]="debian bookworm minbase, debootstrapped here (the Dockerfile's default debian:bookworm-slim)"

# 3. PyTorch's CPU wheel in the build context (served from local disk on this project's machines).
run_step torch_wheel python3 -m pip download --no-deps --python-version 3.11 --only-binary=:all: \
    -d "$REPO/docker/wheelhouse" "torch==$TORCH_VERSION"

# 4. Build.
started=$(date +%s.%N)
run_step build podman build --format docker --isolation chroot -f "$REPO/docker/Dockerfile.rtx" -t "$IMAGE" \
    --build-arg BASE_IMAGE=docker.io/library/debian:bookworm-slim "$REPO"
FIGURES[build_seconds]=$(python3 -c "print(round($(date +%s.%N) - $started, 1))")
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
FIGURES[image_size_mb]=$(python3 -c "print(round($size / 1e6, 1))")
rm -f "$REPO/docker/wheelhouse/torch-"*.whl

# 5. Quick start inside the container: no network, non-root, the host folder at /out.
OUT="$WORK/out"
rm -rf "$OUT" && mkdir -p "$OUT" && chown 10001:10001 "$OUT"
FIGURES[quick_start_command]='`podman run --network none -v OUT:/out qvggt-export:builder --bits w4a4 --out /out --no-progress`'
started=$(date +%s.%N)
run_step quick_start "${PODMAN_RUN[@]}" --network none -v "$OUT:/out" "$IMAGE" --bits w4a4 --out /out --no-progress
FIGURES[quick_start_seconds]=$(python3 -c "print(round($(date +%s.%N) - $started, 1))")

# 6. Checks on the host.
STEP=host_checks
python3 - "$OUT" > "$LOGS/host_checks.log" 2>&1 <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = json.loads((out / "report.json").read_text())
engine = out / "model.engine"
checks = []
def check(ok, text):
    checks.append(("ok" if ok else "FAILED") + ": " + text)
    if not ok:
        print("\n".join(checks)); sys.exit(1)
check(engine.is_file() and engine.stat().st_size > 0, f"model.engine exists ({engine.stat().st_size if engine.exists() else 0} bytes)")
check(report["bits"] == "w4a4", f"report.json bits = {report['bits']}")
check(report["parity"]["passed"] is True, "report.json parity.passed = true ("
      + ", ".join(f"{k} rel_l2 {v['rel_l2']:.1e}" for k, v in report["parity"]["outputs"].items()) + ")")
eng = report["engine"]
check(eng.get("path") is not None and not eng.get("failed"),
      f"report.json engine: {eng.get('size_bytes')} bytes, targets {eng.get('target_sms')}, {eng.get('num_layers')} layers")
check((out / "model.onnx").is_file(), "model.onnx exists")
check(all(p.stat().st_uid == 10001 for p in out.iterdir()), "files owned by the image's non-root user (uid 10001)")
print("\n".join(checks))
print(f"ENGINE_BYTES={engine.stat().st_size}")
PY
mapfile -t lines < "$LOGS/host_checks.log"
for line in "${lines[@]}"; do
    case "$line" in
        ENGINE_BYTES=*) FIGURES[engine_mb]=$(python3 -c "print(round(${line#ENGINE_BYTES=} / 1e6, 2))") ;;
        *) CHECKS+=("$line") ;;
    esac
done

STEP=cleanup
remove_images
STEP=done
write_results passed
echo "build_and_test.sh: passed; $RESULTS" >&2
