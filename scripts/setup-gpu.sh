# shellcheck shell=bash
# The GPU path of scripts/setup.sh (sourced by it; HVDLLM_DEVICE=cuda): the CUDA toolchain checks
# and the environment that builds Horovod with NCCL. Uses setup.sh's PY, pip_, say and die.

torch_cuda() {
    # The CUDA version the installed torch was built for ("13.0"), empty for a CPU build.
    "$PY" -c 'import torch; print(torch.version.cuda or "")'
}

nvcc_bin() {
    # nvcc of HOROVOD_CUDA_HOME, else of CUDA_HOME, else /usr/local/cuda's, else the one on PATH.
    local home
    for home in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}" /usr/local/cuda; do
        if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"; return; fi
    done
    command -v nvcc || echo /usr/local/cuda/bin/nvcc
}

nvcc_cuda() {
    # "13.0" from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88").
    "$(nvcc_bin)" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p'
}

check_cuda_toolchain() {
    # The wheel must be a CUDA build, and nvcc of the same CUDA major: two CUDA runtimes of
    # different majors in one process (torch's and Horovod's) break.
    local torch_ver nvcc_ver
    torch_ver=$(torch_cuda)
    [ -n "$torch_ver" ] || die "step 'torch': torch $TORCH_VERSION installed is a CPU build; the index pip uses serves no CUDA build of it (PyPI's Linux wheel is CUDA 13.0)"
    [ -x "$(nvcc_bin)" ] || die "step 'CUDA toolkit': no nvcc (looked at \$HOROVOD_CUDA_HOME, PATH, /usr/local/cuda): install CUDA $torch_ver's toolkit or set HOROVOD_CUDA_HOME"
    nvcc_ver=$(nvcc_cuda)
    [ "${nvcc_ver%%.*}" = "${torch_ver%%.*}" ] || die "step 'CUDA toolkit': torch $TORCH_VERSION is built for CUDA $torch_ver but $(nvcc_bin) is CUDA $nvcc_ver: install CUDA ${torch_ver%%.*}.x's toolkit or point HOROVOD_CUDA_HOME at it"
    say "CUDA: torch built for $torch_ver, nvcc $nvcc_ver ($(nvcc_bin)), architectures $(cuda_archs)"
}

cuda_archs() {
    # HVDLLM_CUDA_ARCHS, else the compute capabilities of the GPUs present ("9.0" -> 90), else 90.
    local found=""
    if [ -n "${HVDLLM_CUDA_ARCHS:-}" ]; then echo "$HVDLLM_CUDA_ARCHS"; return; fi
    if command -v nvidia-smi >/dev/null; then
        found=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
                | tr -d '. ' | grep -E '^[0-9]+$' | sort -un | paste -sd, || true)
    fi
    echo "${found:-90}"
}

nccl_home() {
    # NCCL from its PyPI package (nvidia-nccl-cuNN, a dependency of the CUDA torch; installed
    # here if missing). The wheel ships libnccl.so.2 but no unversioned libnccl.so, which CMake's
    # FindNCCL looks for: a symlink beside it fixes that.
    local dir major
    major=$(torch_cuda); major=${major%%.*}
    dir=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null) || {
        pip_ install -q "nvidia-nccl-cu$major"
        dir=$("$PY" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])')
    } || die "step 'NCCL': nvidia-nccl-cu$major did not install"
    if [ ! -f "$dir/include/nccl.h" ] || [ ! -f "$dir/lib/libnccl.so.2" ]; then
        die "step 'NCCL': $dir has no include/nccl.h or lib/libnccl.so.2"
    fi
    [ -e "$dir/lib/libnccl.so" ] || ln -s libnccl.so.2 "$dir/lib/libnccl.so"
    echo "$dir"
}

gpu_build_env() {
    # NAME=VALUE words for `env`: NCCL for the GPU collectives, the CUDA toolkit checked above,
    # kernels for cuda_archs, NVTX off (CUDA 13 no longer ships the NVTX 2 library Horovod links).
    local nccl cuda_home
    nccl=$(nccl_home)
    cuda_home=$(dirname "$(dirname "$(nvcc_bin)")")
    echo "HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME=$cuda_home" \
         "HOROVOD_NCCL_INCLUDE=$nccl/include HOROVOD_NCCL_LIB=$nccl/lib HOROVOD_NCCL_LINK=SHARED" \
         "HOROVOD_BUILD_CUDA_CC_LIST=$(cuda_archs) HOROVOD_WITHOUT_NVTX=1 PATH=$cuda_home/bin:$PATH"
}
