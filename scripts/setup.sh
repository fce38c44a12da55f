#!/usr/bin/env bash
# Idempotent setup for hvdllm: OpenMPI, a virtual environment with pinned packages, and
# Horovod 0.28.1 built against the installed torch with the patches in patches/horovod/ applied
# (the C++17 fix it needs on torch >= 2.1, ...; patches/README.md says what each one is for).
# Safe to re-run: every step checks whether its work is already done.
#
# Environment knobs:
#   VENV                 virtual environment to use (default: .venv in the repository)
#   HVDLLM_WHEEL_CACHE   where the built Horovod wheel is kept between clones
#                        (default: ~/.cache/hvdllm/wheels); keyed by Horovod, torch, Python,
#                        machine, a hash of the patch files (a changed patch rebuilds once) and,
#                        for GPU builds, the CUDA version and architectures.
#   HVDLLM_DEVICE        auto (default): cuda when `nvidia-smi -L` lists a GPU, else cpu.
#                        cuda: the CUDA build of the pinned torch, NCCL from its PyPI package,
#                        Horovod built with HOROVOD_GPU_OPERATIONS=NCCL (needs nvcc of the same
#                        CUDA major as that torch). cpu: the CPU build, MPI and Gloo only.
#   HVDLLM_CUDA_ARCHS    GPU architectures to compile Horovod's kernels for, comma-separated
#                        compute capabilities (90 = H100/H200, 80 = A100, 89 = L40S); default:
#                        those of the GPUs present, else 90.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1
CACHE=${HVDLLM_WHEEL_CACHE:-$HOME/.cache/hvdllm/wheels}
PY=$VENV/bin/python
PATCHES=$ROOT/patches/horovod
# Horovod's sdist as published on PyPI, carried in the tree (builds offline, e.g. on a GPU node
# without network: scripts/gpu-check.sh) and checked against PyPI's sha256.
SDIST=$ROOT/third_party/horovod-$HOROVOD_VERSION.tar.gz
SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
DEVICE=${HVDLLM_DEVICE:-auto}

# pip warns about every package for each missing local index directory; keep its real messages.
pip_() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
         return "${PIPESTATUS[0]}"; }
say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

install_openmpi() {
    if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then return; fi
    say "installing OpenMPI from Debian (openmpi-bin libopenmpi-dev)"
    command -v apt-get >/dev/null || die "mpicc not found and no apt-get: install OpenMPI (mpicc, mpirun) first"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
}

install_patch_tool() {
    # Fresh Debian images (CI) may lack `patch`, which applies patches/horovod/*.patch.
    if command -v patch >/dev/null; then return; fi
    say "installing patch from Debian"
    command -v apt-get >/dev/null || die "patch not found and no apt-get: install patch first"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq patch >/dev/null
}

horovod_patches() {
    # The patch files in name order (byte order, whatever the locale), one path a line.
    find "$PATCHES" -maxdepth 1 -type f -name '*.patch' | LC_ALL=C sort
}

patches_hash() {
    # One short hash over every patch file's name and content: part of the wheel cache key.
    local p
    horovod_patches | while read -r p; do
        printf '%s\n' "$(basename "$p")"; cat "$p"
    done | sha256sum | cut -c1-12
}

apply_patches() {
    # Apply each patch to the unpacked sdist in $1; the first one that does not apply exactly
    # (no fuzz, not already applied) stops the setup.
    local src=$1 p
    [ -n "$(horovod_patches)" ] || die "no patches in $PATCHES: the build needs at least the C++17 fix"
    while read -r p; do
        say "applying patches/horovod/$(basename "$p")"
        patch -d "$src" -p1 --forward --batch --fuzz=0 --dry-run --quiet < "$p" >&2 \
            || die "patches/horovod/$(basename "$p") does not apply to Horovod $HOROVOD_VERSION's sdist"
        patch -d "$src" -p1 --forward --batch --fuzz=0 --quiet --no-backup-if-mismatch < "$p" >&2 \
            || die "applying patches/horovod/$(basename "$p") failed"
    done < <(horovod_patches)
}

resolve_device() {
    case "$DEVICE" in
        cpu|cuda) ;;
        auto) if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
                  DEVICE=cuda; else DEVICE=cpu; fi ;;
        *) die "HVDLLM_DEVICE must be auto, cpu or cuda, not '$DEVICE'" ;;
    esac
    say "device: $DEVICE"
}

torch_requirement() {
    # '===' is PEP 440's exact match: it never takes a local build such as 2.13.0+cpu, which
    # '==' would (a machine with a CPU wheel at hand would otherwise keep it). PyPI's Linux wheel
    # of this version is the CUDA 13.0 build.
    if [ "$DEVICE" = cuda ]; then echo "torch===$TORCH_VERSION"; else echo "torch==$TORCH_VERSION"; fi
}

make_venv() {
    [ -x "$PY" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
    # torch is pinned: an unpinned torch pulls a multi-GB CUDA build, and Horovod is compiled
    # against this exact version. Everything the Horovod build imports is installed first;
    # hvdllm's own dependencies come from setup.cfg at the end (one list, not two).
    pip_ install -q --upgrade pip wheel setuptools
    pip_ install -q "$(torch_requirement)" numpy mpi4py cloudpickle psutil pyyaml packaging cffi
}

horovod_ok() {
    # Horovod is usable when it imports, was built against the installed torch, and has MPI + Gloo
    # (+ NCCL on the GPU path).
    HVDLLM_DEVICE=$DEVICE "$PY" - <<'PYEOF' 2>/dev/null
import os
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
assert os.environ["HVDLLM_DEVICE"] != "cuda" or hvd.nccl_built()
PYEOF
}

build_horovod_wheel() {
    local dest=$1 work
    work=$(mktemp -d)
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (about 7 minutes on 2 cores)"
    echo "$SDIST_SHA256  $SDIST" | sha256sum --check --quiet - \
        || die "$SDIST is not Horovod $HOROVOD_VERSION's sdist (sha256 differs)"
    tar -xzf "$SDIST" -C "$work"
    local src=$work/horovod-$HOROVOD_VERSION
    apply_patches "$src"
    # The HOROVOD_WITH_* switches make a failed framework fail the build instead of being skipped;
    # --no-build-isolation lets CMake import the installed torch. The policy minimum lets a CMake 4
    # configure the bundled gloo (harmless with CMake 3).
    local gpu_env=()
    [ "$DEVICE" = cuda ] && read -r -a gpu_env <<< "$(gpu_build_env)"
    env "${gpu_env[@]}" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$work/dist" "$src" \
        > "$work/build.log" 2>&1 || build_failed "$work/build.log"
    mkdir -p "$dest"
    mv "$work"/dist/horovod-*.whl "$dest"/
    rm -rf "$work"
}

build_failed() {
    # Say which part of the build failed and why: its first compiler/CMake/linker error, then the
    # log's tail.
    local log=$1 first
    tail -n 40 "$log" >&2
    first=$(grep -m1 -A1 "CMake Error" "$log" | tr -s ' \n' ' ' || true)
    [ -n "$first" ] || first=$(grep -v "subprocess-exited-with-error" "$log" \
                               | grep -m1 -E "error:|undefined reference" || true)
    die "Horovod build failed${first:+ at: $first} (log above; device $DEVICE)"
}

install_horovod() {
    local pyver key dest
    pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    key="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-$pyver-$(uname -m)-patches-$(patches_hash)"
    [ "$DEVICE" = cuda ] && key="$key-cuda$(torch_cuda)-sm$(cuda_archs | tr ',' '_')"
    dest=$CACHE/$key
    if horovod_ok && [ -f "$VENV/.horovod-build" ] && [ "$(cat "$VENV/.horovod-build")" = "$key" ]; then
        return
    fi
    if ! ls "$dest"/horovod-*.whl >/dev/null 2>&1; then
        build_horovod_wheel "$dest"
    else
        say "reusing cached Horovod wheel from $dest"
    fi
    pip_ install -q --force-reinstall --no-deps "$dest"/horovod-*.whl
    echo "$key" > "$VENV/.horovod-build"
}

check_horovod() {
    local out parts=("PyTorch" "MPI" "Gloo")
    [ "$DEVICE" = cuda ] && parts+=("NCCL")
    out=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $out"
    for part in "${parts[@]}"; do
        echo "$out" | grep -Eq "\[X\] $part" || die "Horovod was built without $part:"$'\n'"$out"
    done
}

# shellcheck source=scripts/setup-gpu.sh
. "$ROOT/scripts/setup-gpu.sh"  # the GPU path's functions (torch_cuda, cuda_archs, gpu_build_env)

resolve_device
install_openmpi
install_patch_tool
make_venv
[ "$DEVICE" = cuda ] && check_cuda_toolchain
install_horovod
check_horovod
pip_ install -q -e "${ROOT}[dev]"  # hvdllm and the dependencies setup.cfg declares
if [ "$DEVICE" = cuda ]; then
    say "ready: $VENV (torch $TORCH_VERSION CUDA $(torch_cuda), Horovod $HOROVOD_VERSION with PyTorch, MPI, Gloo and NCCL)"
else
    say "ready: $VENV (torch $TORCH_VERSION, Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo)"
fi
