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
#                        machine and a hash of the patch files, so a changed patch rebuilds once.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0
HOROVOD_VERSION=0.28.1
CACHE=${HVDLLM_WHEEL_CACHE:-$HOME/.cache/hvdllm/wheels}
PY=$VENV/bin/python
PATCHES=$ROOT/patches/horovod

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

make_venv() {
    [ -x "$PY" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
    # torch is pinned: an unpinned torch pulls a multi-GB CUDA build, and Horovod is compiled
    # against this exact version. Everything the Horovod build imports is installed first;
    # hvdllm's own dependencies come from setup.cfg at the end (one list, not two).
    pip_ install -q --upgrade pip wheel setuptools
    pip_ install -q "torch==$TORCH_VERSION" numpy mpi4py cloudpickle psutil pyyaml packaging cffi
}

horovod_ok() {
    # Horovod is usable when it imports, was built against the installed torch, and has MPI + Gloo.
    "$PY" - <<'PYEOF' 2>/dev/null
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PYEOF
}

build_horovod_wheel() {
    local dest=$1 work
    work=$(mktemp -d)
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (about 7 minutes on 2 cores)"
    pip_ download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    local src=$work/horovod-$HOROVOD_VERSION
    apply_patches "$src"
    # The HOROVOD_WITH_* switches make a failed framework fail the build instead of being skipped;
    # --no-build-isolation lets CMake import the installed torch. The policy minimum lets a CMake 4
    # configure the bundled gloo (harmless with CMake 3).
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$work/dist" "$src" \
        > "$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "Horovod build failed (log above)"; }
    mkdir -p "$dest"
    mv "$work"/dist/horovod-*.whl "$dest"/
    rm -rf "$work"
}

install_horovod() {
    local pyver key dest
    pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    key="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-$pyver-$(uname -m)-patches-$(patches_hash)"
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
    local out
    out=$("$VENV/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $out"
    for part in "PyTorch" "MPI" "Gloo"; do
        echo "$out" | grep -Eq "\[X\] $part" || die "Horovod was built without $part:"$'\n'"$out"
    done
}

install_openmpi
install_patch_tool
make_venv
install_horovod
check_horovod
pip_ install -q -e "${ROOT}[dev]"  # hvdllm and the dependencies setup.cfg declares
say "ready: $VENV (torch $TORCH_VERSION, Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo)"
